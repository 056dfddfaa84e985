//! The long-lived Python worker: spawned without a shell (arguments as a
//! list, killed when dropped), fed commands on stdin by one writer task,
//! its stdout read by one reader task that routes replies to the calls by
//! request id, its stderr drained into tracing. A supervisor restarts a
//! worker that exits, with backoff; calls in flight when it dies end
//! UNAVAILABLE with the reason.
//!
//! The reader never waits for a call's client: when a call's relay is full
//! it asks the worker to pause that request (it leaves the batch with its KV
//! cache) and to resume it once the client has read half (`relay`).

use std::{
    collections::{HashMap, VecDeque},
    path::PathBuf,
    process::Stdio,
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    process::{Child, ChildStderr, ChildStdin, ChildStdout, Command as Process},
    sync::{mpsc, watch},
};
use tokio_util::sync::{CancellationToken, DropGuard};

use super::{
    NAME,
    protocol::{Command, DeviceReport, MAX_LINE_BYTES, Reply},
};
use crate::backend::{
    BackendError, Chunk, Completion, ComputeDevice, DeviceKind, EngineTimings, FinishReason,
    relay::{RELAY_CAPACITY, RelaySender, RelayStream, relay},
};

/// How the worker process is started.
#[derive(Clone, Debug)]
pub struct WorkerSettings {
    pub python: PathBuf,
    pub model: PathBuf,
    pub model_name: String,
    pub cache_dir: PathBuf,
    pub max_batch: u32,
    pub prefill_step: u32,
    /// A BLAS library to preload, with float32 weights (the fast CPU path).
    pub blas: Option<PathBuf>,
    /// How long loading (and a first GGUF conversion) may take.
    pub start_timeout: Duration,
    pub restart_backoff: Duration,
    pub max_restart_backoff: Duration,
}

/// What the running worker reported when it became ready.
#[derive(Clone, Debug, PartialEq)]
pub struct WorkerInfo {
    pub model: String,
    pub device: String,
    pub fast_path: bool,
    pub load_seconds: f64,
    /// The device it computes on, with the memory MLX held once the model
    /// was loaded; `None` from a worker that does not report it.
    pub compute: Option<ComputeDevice>,
}

/// The worker's state, as calls and probes see it.
#[derive(Clone, Debug)]
pub enum WorkerState {
    Starting,
    Ready(WorkerInfo),
    Down(String),
}

/// Where a call's replies go.
struct Route {
    relay: RelaySender,
    /// The worker was asked to pause the request until the client reads.
    paused: bool,
}

/// The calls in flight on the current worker, by request id.
#[derive(Default)]
struct Routes(Mutex<HashMap<u64, Route>>);

impl Routes {
    fn lock(&self) -> MutexGuard<'_, HashMap<u64, Route>> {
        self.0.lock().unwrap_or_else(|poison| poison.into_inner())
    }

    fn fail_all(&self, reason: &str, endpoint: &str) {
        for (_, route) in self.lock().drain() {
            let _ = route.relay.send(Err(BackendError::Unavailable {
                backend: NAME,
                endpoint: endpoint.to_owned(),
                reason: reason.to_owned(),
            }));
        }
    }
}

/// The current worker's stdin and routes; replaced on every restart.
struct Connection {
    commands: mpsc::UnboundedSender<String>,
    routes: Arc<Routes>,
    /// The bytes MLX held at the worker's last report (ready, then each
    /// completed call).
    held_memory: Mutex<Option<u64>>,
}

impl Connection {
    /// Lets a paused request go on: its client has read half its relay.
    fn resume(&self, id: u64) {
        if let Some(route) = self.routes.lock().get_mut(&id)
            && std::mem::take(&mut route.paused)
        {
            let _ = self.commands.send(Command::Resume { id }.line());
        }
    }
}

pub struct Supervisor {
    settings: WorkerSettings,
    state: watch::Sender<WorkerState>,
    connection: Mutex<Option<Arc<Connection>>>,
    next_id: AtomicU64,
    /// The last lines the worker wrote to stderr, for crash reports.
    stderr_tail: Mutex<VecDeque<String>>,
}

const STDERR_TAIL_LINES: usize = 20;
/// A worker that ran this long before dying restarts without waiting.
const STABLE_RUN: Duration = Duration::from_secs(60);

impl Supervisor {
    /// Starts supervising: the first worker is spawned at once; workers
    /// stop (killed with their process handle) when the guard is dropped.
    pub fn start(settings: WorkerSettings) -> (Arc<Self>, DropGuard) {
        let supervisor = Arc::new(Self {
            settings,
            state: watch::Sender::new(WorkerState::Starting),
            connection: Mutex::new(None),
            next_id: AtomicU64::new(1),
            stderr_tail: Mutex::new(VecDeque::new()),
        });
        let stop = CancellationToken::new();
        tokio::spawn(supervise(supervisor.clone(), stop.clone()));
        (supervisor, stop.drop_guard())
    }

    pub fn state(&self) -> WorkerState {
        self.state.borrow().clone()
    }

    /// Waits until the first worker is ready or has failed to start.
    pub async fn started(&self) -> WorkerState {
        let mut states = self.state.subscribe();
        let settled = states
            .wait_for(|state| !matches!(state, WorkerState::Starting))
            .await;
        settled.map_or_else(
            |_| WorkerState::Down("the supervisor stopped".to_owned()),
            |state| state.clone(),
        )
    }

    fn endpoint(&self) -> String {
        self.settings.model.display().to_string()
    }

    /// Sends `command` for a new request id and returns the id with the
    /// receiving end of its replies.
    pub fn submit(
        &self,
        command: impl FnOnce(u64) -> String,
    ) -> Result<(u64, RelayStream), BackendError> {
        let connection = self.connection().ok_or_else(|| self.unavailable())?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (relay, replies) = relay(RELAY_CAPACITY, {
            let connection = Arc::downgrade(&connection);
            move || {
                if let Some(connection) = connection.upgrade() {
                    connection.resume(id);
                }
            }
        });
        connection.routes.lock().insert(
            id,
            Route {
                relay,
                paused: false,
            },
        );
        if connection.commands.send(command(id)).is_err() {
            connection.routes.lock().remove(&id);
            return Err(self.unavailable());
        }
        Ok((id, replies))
    }

    /// Tells the worker to drop request `id`, if it still runs.
    pub fn cancel(&self, id: u64) {
        if let Some(connection) = self.connection()
            && connection.routes.lock().remove(&id).is_some()
        {
            let _ = connection.commands.send(Command::Cancel { id }.line());
        }
    }

    /// Makes a ready worker the one calls go to.
    fn connect(&self, info: WorkerInfo) -> (Arc<Connection>, mpsc::UnboundedReceiver<String>) {
        let (commands, outgoing) = mpsc::unbounded_channel();
        let connection = Arc::new(Connection {
            commands,
            routes: Arc::new(Routes::default()),
            held_memory: Mutex::new(
                info.compute
                    .as_ref()
                    .and_then(|compute| compute.memory_held_bytes),
            ),
        });
        *self.lock_connection() = Some(connection.clone());
        self.state.send_replace(WorkerState::Ready(info));
        (connection, outgoing)
    }

    /// Stops the worker, ends its calls in flight and says why it ended.
    async fn disconnect(
        &self,
        mut child: Child,
        connection: &Connection,
        reason: String,
    ) -> String {
        *self.lock_connection() = None;
        let _ = child.start_kill();
        let status = child.wait().await.ok();
        let reason = format!(
            "{reason} ({}){}",
            describe(status),
            match self.last_stderr() {
                last if last.is_empty() => String::new(),
                last => format!(": {last}"),
            }
        );
        connection.routes.fail_all(&reason, &self.endpoint());
        reason
    }

    fn lock_connection(&self) -> MutexGuard<'_, Option<Arc<Connection>>> {
        self.connection
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }

    fn connection(&self) -> Option<Arc<Connection>> {
        self.lock_connection().clone()
    }

    /// The bytes the running worker's MLX held at its last report.
    pub fn held_memory(&self) -> Option<u64> {
        let connection = self.connection()?;
        *connection
            .held_memory
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }

    fn unavailable(&self) -> BackendError {
        let reason = match self.state() {
            WorkerState::Starting => "the MLX worker is starting".to_owned(),
            WorkerState::Down(reason) => reason,
            WorkerState::Ready(_) => "the MLX worker is restarting".to_owned(),
        };
        BackendError::Unavailable {
            backend: NAME,
            endpoint: self.endpoint(),
            reason,
        }
    }

    fn remember_stderr(&self, line: String) {
        let mut tail = self
            .stderr_tail
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        if tail.len() == STDERR_TAIL_LINES {
            tail.pop_front();
        }
        tail.push_back(line);
    }

    fn last_stderr(&self) -> String {
        let tail = self
            .stderr_tail
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        tail.back().cloned().unwrap_or_default()
    }

    fn spawn(&self) -> std::io::Result<Child> {
        let settings = &self.settings;
        let mut process = Process::new(&settings.python);
        process
            .arg("-c")
            .arg(super::WORKER_SOURCE)
            .arg("--model")
            .arg(&settings.model)
            .arg("--name")
            .arg(&settings.model_name)
            .arg("--cache-dir")
            .arg(&settings.cache_dir)
            .arg("--max-batch")
            .arg(settings.max_batch.to_string())
            .arg("--prefill-step")
            .arg(settings.prefill_step.to_string())
            // Models load from local paths only.
            .env("HF_HUB_OFFLINE", "1")
            .env("TRANSFORMERS_OFFLINE", "1")
            .env("TOKENIZERS_PARALLELISM", "false")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        if let Some(blas) = &settings.blas {
            process.arg("--dequantize").env("LD_PRELOAD", blas);
            if let Some(dir) = blas.parent() {
                // The BLAS's own dependencies (libgfortran) sit beside it or
                // one level up, as Debian lays them out.
                let mut paths = vec![dir.to_path_buf()];
                paths.extend(dir.parent().map(PathBuf::from));
                if let Ok(joined) = std::env::join_paths(paths) {
                    process.env("LD_LIBRARY_PATH", joined);
                }
            }
            process.env("OPENBLAS_NUM_THREADS", "1");
        }
        process.spawn()
    }
}

/// Runs workers one after another until `stop`.
async fn supervise(supervisor: Arc<Supervisor>, stop: CancellationToken) {
    let mut backoff = None::<Duration>;
    loop {
        if let Some(wait) = backoff {
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(wait) => {}
            }
            supervisor.state.send_replace(WorkerState::Starting);
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = run_once(&supervisor, &mut backoff) => {}
        }
    }
}

/// Starts one worker and serves through it until it exits.
async fn run_once(supervisor: &Arc<Supervisor>, backoff: &mut Option<Duration>) {
    let settings = &supervisor.settings;
    let started = Instant::now();
    let outcome = serve_one(supervisor).await;
    let reason = match outcome {
        Ok(reason) | Err(reason) => reason,
    };
    tracing::warn!(%reason, "MLX worker down");
    supervisor.state.send_replace(WorkerState::Down(reason));
    *backoff = Some(if started.elapsed() >= STABLE_RUN {
        settings.restart_backoff
    } else {
        backoff
            .map_or(settings.restart_backoff, |last| last * 2)
            .min(settings.max_restart_backoff)
    });
}

/// One worker's life; returns why it ended.
async fn serve_one(supervisor: &Arc<Supervisor>) -> Result<String, String> {
    let mut child = supervisor.spawn().map_err(|error| {
        format!(
            "cannot start {}: {error}",
            supervisor.settings.python.display()
        )
    })?;
    let stdin = child.stdin.take().expect("piped stdin");
    let mut replies = BufReader::new(child.stdout.take().expect("piped stdout"));
    drain_stderr(supervisor, child.stderr.take().expect("piped stderr"));
    let info = await_ready(supervisor, &mut child, &mut replies).await?;
    tracing::info!(
        model = %info.model,
        device = %info.device,
        fast_path = info.fast_path,
        load_seconds = info.load_seconds,
        "MLX worker ready"
    );
    let (connection, outgoing) = supervisor.connect(info);
    let reason = tokio::select! {
        reason = write_commands(stdin, outgoing) => reason,
        reason = route_replies(&mut replies, &connection) => reason,
    };
    Ok(supervisor.disconnect(child, &connection, reason).await)
}

/// Forwards the worker's stderr to tracing, keeping its last lines for
/// crash reports.
fn drain_stderr(supervisor: &Arc<Supervisor>, stderr: ChildStderr) {
    let weak = Arc::downgrade(supervisor);
    tokio::spawn(async move {
        let mut lines = BufReader::new(stderr).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            tracing::info!(target: "rigger_inference::mlx_worker", "{line}");
            match weak.upgrade() {
                Some(supervisor) => supervisor.remember_stderr(line),
                None => return,
            }
        }
    });
}

/// Waits for the worker's `ready` line, within the start timeout.
async fn await_ready(
    supervisor: &Supervisor,
    child: &mut Child,
    replies: &mut BufReader<ChildStdout>,
) -> Result<WorkerInfo, String> {
    let timeout = supervisor.settings.start_timeout;
    let ready = tokio::time::timeout(timeout, read_reply(replies))
        .await
        .map_err(|_| {
            format!(
                "the MLX worker did not load {} within {timeout:?}",
                supervisor.endpoint()
            )
        })?;
    match ready? {
        Some(Reply::Ready {
            model,
            device,
            fast_path,
            load_seconds,
            compute,
            active_memory,
        }) => Ok(WorkerInfo {
            model,
            device,
            fast_path,
            load_seconds,
            compute: compute.map(|report| compute_device(report, active_memory)),
        }),
        Some(Reply::Fatal { message }) => Err(format!("the MLX worker could not start: {message}")),
        Some(other) => Err(format!("the MLX worker sent {other:?} before ready")),
        None => {
            let status = child.wait().await.ok();
            Err(format!(
                "the MLX worker exited while starting ({}): {}",
                describe(status),
                supervisor.last_stderr()
            ))
        }
    }
}

/// Writes queued commands to the worker's stdin; returns why it stopped.
async fn write_commands(
    mut stdin: ChildStdin,
    mut outgoing: mpsc::UnboundedReceiver<String>,
) -> String {
    while let Some(line) = outgoing.recv().await {
        let written = match stdin.write_all(line.as_bytes()).await {
            Ok(()) => stdin.flush().await,
            Err(error) => Err(error),
        };
        if let Err(error) = written {
            return format!("cannot write to the MLX worker: {error}");
        }
    }
    "the MLX backend stopped".to_owned()
}

/// Hands each reply to its call; returns why the worker's output ended.
async fn route_replies(replies: &mut BufReader<ChildStdout>, connection: &Connection) -> String {
    loop {
        match read_reply(replies).await {
            Ok(Some(reply)) => {
                if let Some(reason) = route(connection, reply) {
                    return reason;
                }
            }
            Ok(None) => return "the MLX worker exited".to_owned(),
            Err(reason) => return reason,
        }
    }
}

fn describe(status: Option<std::process::ExitStatus>) -> String {
    status.map_or_else(|| "unknown status".to_owned(), |status| status.to_string())
}

/// Reads one reply line; `None` at end of output.
async fn read_reply(replies: &mut BufReader<ChildStdout>) -> Result<Option<Reply>, String> {
    let mut line = Vec::new();
    loop {
        let buffer = replies
            .fill_buf()
            .await
            .map_err(|error| format!("cannot read from the MLX worker: {error}"))?;
        if buffer.is_empty() {
            return Ok(None);
        }
        let (taken, complete) = match buffer.iter().position(|byte| *byte == b'\n') {
            Some(end) => (end + 1, true),
            None => (buffer.len(), false),
        };
        line.extend_from_slice(&buffer[..taken]);
        replies.consume(taken);
        if line.len() > MAX_LINE_BYTES {
            return Err(format!(
                "the MLX worker sent a line over {MAX_LINE_BYTES} bytes"
            ));
        }
        if complete {
            break;
        }
    }
    let text = String::from_utf8(line)
        .map_err(|_| "the MLX worker sent a line that is not UTF-8".to_owned())?;
    Reply::parse(text.trim_end()).map(Some)
}

/// The worker's device as GetStatus reports it.
fn compute_device(report: DeviceReport, held: Option<u64>) -> ComputeDevice {
    ComputeDevice {
        kind: match report.kind.as_str() {
            "cpu" => DeviceKind::Cpu,
            "metal" => DeviceKind::Metal,
            "cuda" => DeviceKind::Cuda,
            _ => DeviceKind::OtherGpu,
        },
        name: report.name,
        memory_total_bytes: (report.memory_total > 0).then_some(report.memory_total),
        memory_used_bytes: None,
        memory_held_bytes: held,
    }
}

/// Delivers a reply to its call, pausing the request when its relay is
/// full; returns a reason to stop the worker when the reply shows the
/// protocol broke.
fn route(connection: &Connection, reply: Reply) -> Option<String> {
    let (id, item, last) = match reply {
        Reply::Text { id, text } => (id, Ok(Chunk::Text(text)), false),
        Reply::Done {
            id,
            finish_reason,
            prompt_tokens,
            cached_tokens,
            generation_tokens,
            prompt_seconds,
            generation_seconds,
            peak_memory: _,
            active_memory,
        } => {
            if active_memory.is_some() {
                *connection
                    .held_memory
                    .lock()
                    .unwrap_or_else(|poison| poison.into_inner()) = active_memory;
            }
            let completion = Completion {
                backend: NAME,
                model: String::new(),
                finish_reason: if finish_reason == "length" {
                    FinishReason::Length
                } else {
                    FinishReason::Stop
                },
                prompt_tokens,
                completion_tokens: generation_tokens,
                cached_prompt_tokens: cached_tokens,
                engine_timings: Some(EngineTimings {
                    prompt: Duration::from_secs_f64(prompt_seconds.max(0.0)),
                    generation: Duration::from_secs_f64(generation_seconds.max(0.0)),
                }),
            };
            (id, Ok(Chunk::Done(completion)), true)
        }
        Reply::Error {
            id,
            message,
            invalid_request,
        } => {
            let error = if invalid_request {
                BackendError::Rejected {
                    backend: NAME,
                    reason: message,
                }
            } else {
                BackendError::Failed {
                    backend: NAME,
                    reason: message,
                }
            };
            (id, Err(error), true)
        }
        Reply::ProtocolError { message } => {
            return Some(format!(
                "the MLX worker could not read our request: {message}"
            ));
        }
        Reply::Fatal { message } => return Some(format!("the MLX worker failed: {message}")),
        Reply::Ready { .. } => return Some("the MLX worker restarted itself".to_owned()),
    };
    let mut routes = connection.routes.lock();
    // A reply for a call that was cancelled (or already ended) is dropped.
    if let Some(route) = routes.get_mut(&id) {
        let _ = route.relay.send(item);
        if last {
            routes.remove(&id);
        } else if !route.paused && !route.relay.has_room() {
            route.paused = true;
            let _ = connection.commands.send(Command::Pause { id }.line());
        }
    }
    None
}
