//! Shared fixtures of the integration tests: the real llama.cpp server, the
//! Ollama stand-in, the scripted in-process backend, and a rigger-inference
//! server on a loopback port.
//!
//! Each test binary starts at most one llama.cpp server (`llama()`), shared by
//! its tests; tests that stop their backend start a private one.

#![allow(dead_code)]

pub mod health;
pub mod ollama;
pub mod scripted;
pub mod tiny_models;
pub mod two_factor;

use std::{
    future::Future,
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::PathBuf,
    pin::Pin,
    process::{Child, ChildStdin, Command, Stdio},
    sync::{Arc, OnceLock},
    time::Duration,
};

use clap::Parser;
use futures_util::StreamExt;
use rigger_inference::{
    backend::Backend,
    config::{Config, cache_dir},
    proto::{
        GenerateRequest, GenerateResponse, GenerationSummary, GetStatusRequest,
        generate_response::Event, inference_service_client::InferenceServiceClient,
    },
};
use tokio::{net::TcpListener, sync::oneshot, task::JoinHandle};
use tonic::{Status, Streaming, transport::Channel};

/// Name under which the llama.cpp server serves the default model.
pub const MODEL_ALIAS: &str = "smollm2-135m-instruct";

pub fn python() -> PathBuf {
    let python = cache_dir().join("venv/bin/python");
    assert!(
        python.exists(),
        "{} is missing: run `make test` (or scripts/setup-python.sh) first",
        python.display()
    );
    python
}

pub fn model_path() -> PathBuf {
    cache_dir().join("models/SmolLM2-135M-Instruct.Q4_1.gguf")
}

pub fn repo_path(relative: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(relative)
}

/// A loopback port that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("bind an ephemeral port")
        .port()
}

/// A real llama.cpp HTTP server (PyPI xllamacpp) serving the default model.
pub struct LlamaServer {
    pub port: u16,
    child: Child,
    // Held open: the server exits when it closes, including when this
    // process dies without running destructors.
    _stdin: ChildStdin,
}

impl LlamaServer {
    pub fn start() -> Self {
        Self::start_on(free_port())
    }

    pub fn start_on(port: u16) -> Self {
        Self::launch(port, "1", "4")
    }

    /// A server with the given threads and parallel slots, for benchmarks.
    pub fn start_with(threads: &str, parallel: &str) -> Self {
        Self::launch(free_port(), threads, parallel)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    fn launch(port: u16, threads: &str, parallel: &str) -> Self {
        let mut child = Command::new(python())
            .arg(repo_path("scripts/llama_server.py"))
            .args(["--model".as_ref(), model_path().as_os_str()])
            .args(["--alias", MODEL_ALIAS, "--port", &port.to_string()])
            .args([
                "--threads",
                threads,
                "--parallel",
                parallel,
                "--ctx",
                "16384",
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start scripts/llama_server.py");
        let stdin = child.stdin.take().expect("piped stdin");
        let stdout = child.stdout.take().expect("piped stdout");
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("read the llama server's READY line");
        assert_eq!(
            line.trim(),
            format!("READY {port}"),
            "llama server did not start"
        );
        Self {
            port,
            child,
            _stdin: stdin,
        }
    }

    /// Base URL of its OpenAI-compatible API.
    pub fn openai_url(&self) -> String {
        format!("http://127.0.0.1:{}/v1", self.port)
    }

    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for LlamaServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The llama.cpp server shared by the tests of one binary.
pub fn llama() -> &'static LlamaServer {
    static SERVER: OnceLock<LlamaServer> = OnceLock::new();
    SERVER.get_or_init(LlamaServer::start)
}

/// Configuration with the given flags on top of the defaults; probes are
/// frequent so health tests finish quickly; metrics are off unless a test
/// asks (many servers share one host), and so are test generations, which
/// would otherwise show up in what tests count.
pub fn config(flags: &[&str]) -> Config {
    let mut args = vec![
        "rigger-inference",
        "--probe-interval",
        "200ms",
        "--probe-timeout",
        "1s",
        "--metrics-listen",
        "off",
        "--readiness-generation-interval",
        "0s",
    ];
    args.extend_from_slice(flags);
    Config::parse_from(args)
}

/// A configuration serving through the shared llama.cpp server.
pub fn openai_config() -> Config {
    config(&[
        "--backend",
        "openai",
        "--openai-base-url",
        &llama().openai_url(),
    ])
}

/// What `serve` waits on to shut down.
type ShutdownSignal = Pin<Box<dyn Future<Output = ()> + Send>>;

/// A rigger-inference server on a loopback port, stopped on drop.
pub struct TestServer {
    pub addr: SocketAddr,
    shutdown: Option<oneshot::Sender<()>>,
    handle: Option<JoinHandle<Result<(), rigger_inference::server::ServerError>>>,
}

impl TestServer {
    /// Starts a server and waits until its backends are selected (and the
    /// embedded model loaded), as a client retrying UNAVAILABLE would.
    pub async fn start(config: Config) -> Self {
        Self::spawn(config).await.ready().await
    }

    /// Starts a server over `backends` (in failover order) instead of those
    /// the configuration selects.
    pub async fn with_backends(config: Config, backends: Vec<Arc<dyn Backend>>) -> Self {
        Self::launch(|listener, stop| {
            rigger_inference::app::serve_backends(listener, config, backends, stop)
        })
        .await
        .ready()
        .await
    }

    async fn ready(self) -> Self {
        let mut client = self.client().await;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            match client.get_status(GetStatusRequest {}).await {
                Err(status)
                    if status.code() == tonic::Code::Unavailable
                        && tokio::time::Instant::now() < deadline =>
                {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                _ => return self,
            }
        }
    }

    /// Starts a server without waiting for its backends.
    pub async fn spawn(config: Config) -> Self {
        Self::launch(|listener, stop| rigger_inference::app::serve(listener, config, stop)).await
    }

    async fn launch<F>(serve: impl FnOnce(TcpListener, ShutdownSignal) -> F) -> Self
    where
        F: Future<Output = Result<(), rigger_inference::server::ServerError>> + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind loopback");
        let addr = listener.local_addr().expect("bound address");
        let (shutdown, stop) = oneshot::channel();
        let handle = tokio::spawn(serve(
            listener,
            Box::pin(async {
                let _ = stop.await;
            }),
        ));
        Self {
            addr,
            shutdown: Some(shutdown),
            handle: Some(handle),
        }
    }

    /// Asks the server to shut down (as SIGTERM does) without waiting.
    pub fn shut_down(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub async fn channel(&self) -> Channel {
        Channel::from_shared(self.url())
            .expect("valid URL")
            .connect_timeout(Duration::from_secs(5))
            .connect()
            .await
            .expect("connect to the test server")
    }

    pub async fn client(&self) -> InferenceServiceClient<Channel> {
        InferenceServiceClient::new(self.channel().await)
    }

    /// Waits for the server to stop by itself and returns how `serve` ended.
    pub async fn exited(mut self) -> Result<(), rigger_inference::server::ServerError> {
        let handle = self.handle.take().expect("stopped once");
        tokio::time::timeout(Duration::from_secs(30), handle)
            .await
            .expect("the server stopped by itself")
            .expect("server task did not panic")
    }

    /// Stops the server and returns how `serve` ended.
    pub async fn stop(mut self) -> Result<(), rigger_inference::server::ServerError> {
        self.shut_down();
        self.handle
            .take()
            .expect("stopped once")
            .await
            .expect("server task did not panic")
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.shut_down();
    }
}

/// Admission as GetStatus reports it: (in flight, queued, refused).
pub async fn admission(client: &mut InferenceServiceClient<Channel>) -> (u64, u64, u64) {
    let status = client
        .get_status(GetStatusRequest {})
        .await
        .expect("GetStatus")
        .into_inner()
        .admission
        .expect("admission status");
    (
        status.in_flight,
        status.queued_interactive + status.queued_batch,
        status.rejected,
    )
}

/// A Generate request decoding greedily, so its answer is reproducible.
pub fn greedy(prompt: &str, max_tokens: u32) -> GenerateRequest {
    GenerateRequest {
        prompt: prompt.into(),
        sampling: Some(rigger_inference::proto::SamplingOptions {
            max_tokens: Some(max_tokens),
            temperature: Some(0.0),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A Generate stream read to its end.
#[derive(Debug)]
pub struct Generated {
    pub text: String,
    pub summary: GenerationSummary,
    /// Text messages that carried the text.
    pub pieces: usize,
}

/// Reads a Generate stream to its end, checking the summary comes last.
pub async fn collect(mut stream: Streaming<GenerateResponse>) -> Result<Generated, Status> {
    let mut text = String::new();
    let mut pieces = 0;
    while let Some(message) = stream.next().await {
        match message?.event.expect("every message carries an event") {
            Event::Text(piece) => {
                text.push_str(&piece);
                pieces += 1;
            }
            Event::Summary(summary) => {
                assert!(
                    stream.next().await.is_none(),
                    "the summary is the last message"
                );
                return Ok(Generated {
                    text,
                    summary,
                    pieces,
                });
            }
        }
    }
    panic!("stream ended without a summary");
}

/// Calls Generate and reads the stream to its end.
pub async fn generate(
    client: &mut InferenceServiceClient<Channel>,
    request: GenerateRequest,
) -> Result<Generated, Status> {
    collect(client.generate(request).await?.into_inner()).await
}

/// A request carrying W3C trace context: `traceparent`, and `tracestate`
/// when given.
pub fn traced<T>(message: T, traceparent: &str, tracestate: Option<&str>) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert("traceparent", traceparent.parse().expect("ASCII"));
    if let Some(state) = tracestate {
        request
            .metadata_mut()
            .insert("tracestate", state.parse().expect("ASCII"));
    }
    request
}
