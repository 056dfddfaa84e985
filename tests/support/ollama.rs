//! An Ollama-compatible HTTP server for the tests, since no registry here
//! ships the Ollama binary. It follows Ollama's API documentation:
//! `GET /api/version`, `GET /api/tags`, `POST /api/chat` (NDJSON stream of
//! `{model, created_at, message, done}` lines ending in a `done: true` line
//! with `done_reason` and nanosecond statistics, or one JSON object when
//! `stream` is false), `POST /api/generate` without a prompt (loads the
//! model, answering `done_reason: "load"`; with `keep_alive: 0` unloads it,
//! `"unload"`), `GET /api/ps` (the loaded models with their size and expiry),
//! and `{"error": "…"}` bodies with Ollama's status codes. A chat loads its
//! model too, kept for its `keep_alive` (Ollama's default five minutes).
//! Text comes from a real engine: the llama.cpp server, reached through the
//! crate's OpenAI-compatible backend; `/api/generate` with a prompt is not
//! served (400), as the backend generates through `/api/chat` only.
//!
//! Test controls (not part of Ollama): `busy` answers 503 as a full queue
//! does; `fail_after` sends an `{"error": …}` line after that many text lines;
//! `cut_at` drops the connection in place of line `cut_at` (1 = before any
//! text), as a crashing server does; `abandoned` counts chat streams the
//! client dropped before their end; `trace_headers` records the
//! `traceparent`/`tracestate` of each chat request; `generate_bodies` records
//! each `/api/generate` body as sent; `removed` deletes the model, as
//! `ollama rm` does.

use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, SystemTime},
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
/// Bytes `/api/ps` reports for the loaded model: weights plus KV cache and
/// compute graph, more than the file `/api/tags` lists.
pub const LOADED_SIZE: u64 = 187_695_104;
/// Context length `/api/ps` reports for the loaded model.
const LOADED_CONTEXT: u32 = 4096;
/// Ollama keeps a model this long after a call that gives no `keep_alive`.
const DEFAULT_KEEP_ALIVE: Duration = Duration::from_secs(5 * 60);
const DIGEST: &str = "4f7c2c5b2a0e4f3b8f0d7c1e9a6b5d4c3b2a1f0e9d8c7b6a5f4e3d2c1b0a9f8e";

#[derive(Default)]
pub struct Controls {
    pub busy: AtomicBool,
    pub fail_after: AtomicUsize,
    pub cut_at: AtomicUsize,
    pub trace_headers: std::sync::Mutex<Vec<(Option<String>, Option<String>)>>,
    pub abandoned: AtomicUsize,
    pub completed: AtomicUsize,
    pub generate_bodies: Mutex<Vec<Value>>,
    pub removed: AtomicBool,
}

impl Controls {
    /// The `/api/generate` bodies received so far.
    pub fn generate_bodies(&self) -> Vec<Value> {
        self.generate_bodies.lock().expect("bodies").clone()
    }
}

struct AppState {
    engine: OpenAiBackend,
    controls: Arc<Controls>,
    /// When the loaded model expires; `None` while it is not loaded.
    expires_at: Mutex<Option<SystemTime>>,
}

impl AppState {
    /// Whether `model` names the pulled model (Ollama reads a name without
    /// a tag as `:latest`).
    fn has(&self, model: &str) -> bool {
        !self.controls.removed.load(Ordering::SeqCst)
            && (model == MODEL || format!("{model}:latest") == MODEL)
    }

    /// Loads the model, or keeps it loaded, for `keep_alive` from now.
    fn keep_loaded(&self, keep_alive: Duration) {
        let expires_at = SystemTime::now()
            .checked_add(keep_alive)
            .unwrap_or(SystemTime::UNIX_EPOCH + FOREVER);
        *self.expires_at.lock().expect("expiry") = Some(expires_at);
    }

    fn unload(&self) {
        *self.expires_at.lock().expect("expiry") = None;
    }

    /// The model's expiry while it is loaded.
    fn loaded_until(&self) -> Option<SystemTime> {
        let mut expires_at = self.expires_at.lock().expect("expiry");
        if expires_at.is_some_and(|at| at <= SystemTime::now()) {
            *expires_at = None;
        }
        *expires_at
    }
}

/// What Ollama makes of a negative `keep_alive`: the longest duration Go
/// holds.
const FOREVER: Duration = Duration::from_nanos(i64::MAX as u64);

/// A `keep_alive` as Ollama reads it: seconds, or a duration string;
/// negative keeps the model loaded; absent, the default.
fn keep_alive(value: Option<&Value>) -> Result<Duration, String> {
    match value {
        None => Ok(DEFAULT_KEEP_ALIVE),
        Some(Value::Number(seconds)) => {
            let seconds = seconds.as_f64().unwrap_or_default();
            Ok(if seconds < 0.0 {
                FOREVER
            } else {
                Duration::from_secs_f64(seconds)
            })
        }
        Some(Value::String(text)) if text == "0" => Ok(Duration::ZERO),
        Some(Value::String(text)) => match text.strip_prefix('-') {
            Some(magnitude) => humantime::parse_duration(magnitude).map(|_| FOREVER),
            None => humantime::parse_duration(text),
        }
        .map_err(|error| format!("time: invalid duration \"{text}\": {error}")),
        Some(other) => Err(format!("Unsupported type: '{other}'")),
    }
}

pub struct OllamaStandIn {
    pub addr: SocketAddr,
    pub controls: Arc<Controls>,
    stop: Option<oneshot::Sender<()>>,
    served: Option<tokio::task::JoinHandle<()>>,
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
            expires_at: Mutex::new(None),
        });
        let app = Router::new()
            .route("/api/version", get(version))
            .route("/api/tags", get(tags))
            .route("/api/ps", get(running))
            .route("/api/generate", post(generate))
            .route("/api/chat", post(chat))
            .with_state(state);
        let (stop, stopped) = oneshot::channel::<()>();
        let served = tokio::spawn(async move {
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
            served: Some(served),
        }
    }

    pub fn host(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stops serving and returns once the port is closed: Ollama is down.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(served) = self.served.take() {
            served.await.expect("stand-in server task");
        }
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

fn details() -> Value {
    json!({
        "parent_model": "",
        "format": "gguf",
        "family": "llama",
        "families": ["llama"],
        "parameter_size": "135M",
        "quantization_level": "Q4_1"
    })
}

async fn tags(State(state): State<Arc<AppState>>) -> Json<Value> {
    if state.controls.removed.load(Ordering::SeqCst) {
        return Json(json!({ "models": [] }));
    }
    Json(json!({
        "models": [{
            "name": MODEL,
            "model": MODEL,
            "modified_at": CREATED_AT,
            "size": 98_362_432,
            "digest": DIGEST,
            "details": details()
        }]
    }))
}

async fn running(State(state): State<Arc<AppState>>) -> Json<Value> {
    let models: Vec<Value> = state
        .loaded_until()
        .map(|expires_at| {
            json!({
                "name": MODEL,
                "model": MODEL,
                "size": LOADED_SIZE,
                "digest": DIGEST,
                "details": details(),
                "expires_at": prost_types::Timestamp::from(expires_at).to_string(),
                "size_vram": 0,
                "context_length": LOADED_CONTEXT
            })
        })
        .into_iter()
        .collect();
    Json(json!({ "models": models }))
}

#[derive(Deserialize)]
struct GenerateBody {
    model: String,
    #[serde(default)]
    prompt: Option<String>,
    #[serde(default)]
    keep_alive: Option<Value>,
}

/// `/api/generate` without a prompt: loads the model, or with a zero
/// `keep_alive` unloads it, answering with one JSON object.
async fn generate(State(state): State<Arc<AppState>>, Json(body): Json<Value>) -> Response {
    state
        .controls
        .generate_bodies
        .lock()
        .expect("bodies")
        .push(body.clone());
    let body: GenerateBody = match serde_json::from_value(body) {
        Ok(body) => body,
        Err(invalid) => return error(StatusCode::BAD_REQUEST, &invalid.to_string()),
    };
    if !state.has(&body.model) {
        return error(
            StatusCode::NOT_FOUND,
            &format!("model '{}' not found", body.model),
        );
    }
    if body.prompt.is_some_and(|prompt| !prompt.is_empty()) {
        return error(
            StatusCode::BAD_REQUEST,
            "the stand-in generates through /api/chat only",
        );
    }
    let keep_alive = match keep_alive(body.keep_alive.as_ref()) {
        Ok(keep_alive) => keep_alive,
        Err(invalid) => return error(StatusCode::BAD_REQUEST, &invalid),
    };
    let done_reason = if body.keep_alive.is_some() && keep_alive.is_zero() {
        state.unload();
        "unload"
    } else {
        state.keep_loaded(keep_alive);
        "load"
    };
    Json(json!({
        "model": body.model,
        "created_at": CREATED_AT,
        "response": "",
        "done": true,
        "done_reason": done_reason
    }))
    .into_response()
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
    #[serde(default)]
    keep_alive: Option<Value>,
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
    if !state.has(&body.model) {
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
    match keep_alive(body.keep_alive.as_ref()) {
        Ok(keep_alive) => state.keep_loaded(keep_alive),
        Err(invalid) => return error(StatusCode::BAD_REQUEST, &invalid),
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
