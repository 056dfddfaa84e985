//! Optional export of one span per inference call to an OpenTelemetry
//! collector: OTLP over HTTP with JSON bodies (`POST <endpoint>/v1/traces`),
//! which every OTLP receiver accepts. The span carries the call's trace
//! context (`trace_context`), so it sits between the caller's span and the
//! runtime's. Spans are batched by a background task; when the collector is
//! slow or down they are dropped (and counted), never held against calls.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime},
};

use serde_json::{Value, json};
use tokio::{sync::mpsc, task::JoinHandle};
use tonic::Code;

use super::rpc::Rpc;
use crate::trace_context::TraceContext;

/// Spans waiting for export; beyond it new ones are dropped.
const QUEUE: usize = 4096;
/// Spans sent in one request at most.
const BATCH: usize = 512;
/// How long a finished span may wait for its batch.
const FLUSH_EVERY: Duration = Duration::from_secs(1);
/// How long one export request may take.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);

/// A call that ended, as exported.
pub(super) struct FinishedCall {
    pub context: TraceContext,
    pub rpc: Rpc,
    pub backend: &'static str,
    pub start: SystemTime,
    pub duration: Duration,
    pub code: Code,
}

/// The handle calls report to.
pub(super) struct SpanExport {
    queue: mpsc::Sender<FinishedCall>,
    dropped: AtomicU64,
}

impl SpanExport {
    /// Starts exporting to the collector at `endpoint` (its base URL, as in
    /// `OTEL_EXPORTER_OTLP_ENDPOINT`); the task ends, after a last flush,
    /// once every handle is dropped.
    pub(super) fn start(endpoint: &str, service_name: String) -> (Arc<Self>, JoinHandle<()>) {
        let (queue, spans) = mpsc::channel(QUEUE);
        let url = format!("{}/v1/traces", endpoint.trim_end_matches('/'));
        let task = tokio::spawn(export(spans, url, service_name));
        let handle = Arc::new(Self {
            queue,
            dropped: AtomicU64::new(0),
        });
        (handle, task)
    }

    /// Exports `call` if its trace is recorded.
    pub(super) fn record(&self, call: FinishedCall) {
        if !call.context.sampled() {
            return;
        }
        if self.queue.try_send(call).is_err() {
            let dropped = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
            if dropped.is_power_of_two() {
                tracing::warn!(dropped, "span export is behind; spans dropped");
            }
        }
    }
}

async fn export(mut spans: mpsc::Receiver<FinishedCall>, url: String, service_name: String) {
    let client = reqwest::Client::builder()
        .timeout(EXPORT_TIMEOUT)
        .build()
        .unwrap_or_default();
    let mut batch = Vec::with_capacity(BATCH);
    // When the oldest span of the batch must be sent.
    let mut due: Option<tokio::time::Instant> = None;
    loop {
        let room = BATCH - batch.len();
        let open = tokio::select! {
            received = spans.recv_many(&mut batch, room) => received > 0,
            () = tokio::time::sleep_until(due.unwrap_or_else(tokio::time::Instant::now)), if due.is_some() => true,
        };
        let now = tokio::time::Instant::now();
        let first_due = *due.get_or_insert(now + FLUSH_EVERY);
        if !batch.is_empty() && (batch.len() >= BATCH || now >= first_due || !open) {
            send(&client, &url, &service_name, std::mem::take(&mut batch)).await;
            due = None;
        }
        if batch.is_empty() {
            due = None;
        }
        if !open {
            return;
        }
    }
}

async fn send(client: &reqwest::Client, url: &str, service_name: &str, calls: Vec<FinishedCall>) {
    let body = request_body(service_name, &calls);
    match client.post(url).json(&body).send().await {
        Ok(response) if response.status().is_success() => {}
        Ok(response) => tracing::warn!(status = %response.status(), url, "span export refused"),
        Err(error) => tracing::warn!(%error, url, "span export failed"),
    }
}

/// An OTLP `ExportTraceServiceRequest` in the protocol's JSON mapping.
fn request_body(service_name: &str, calls: &[FinishedCall]) -> Value {
    json!({
        "resourceSpans": [{
            "resource": { "attributes": [string_attribute("service.name", service_name)] },
            "scopeSpans": [{
                "scope": { "name": "rigger-inference", "version": env!("CARGO_PKG_VERSION") },
                "spans": calls.iter().map(span).collect::<Vec<_>>(),
            }],
        }],
    })
}

/// gRPC codes that mark a server span as failed, per OpenTelemetry's RPC
/// conventions; the others are the caller's doing.
fn server_error(code: Code) -> bool {
    matches!(
        code,
        Code::Unknown
            | Code::DeadlineExceeded
            | Code::Unimplemented
            | Code::Internal
            | Code::Unavailable
            | Code::DataLoss
    )
}

/// Span kind SERVER and status codes UNSET/ERROR of the OTLP protocol.
const SPAN_KIND_SERVER: u8 = 2;
const STATUS_UNSET: u8 = 0;
const STATUS_ERROR: u8 = 2;

fn span(call: &FinishedCall) -> Value {
    let start = unix_nanos(call.start);
    let end = start.saturating_add(call.duration.as_nanos().try_into().unwrap_or(u64::MAX));
    let mut span = json!({
        "traceId": call.context.trace_id(),
        "spanId": call.context.span_id(),
        "name": format!("rigger.inference.v1.InferenceService/{}", call.rpc.method()),
        "kind": SPAN_KIND_SERVER,
        "startTimeUnixNano": start.to_string(),
        "endTimeUnixNano": end.to_string(),
        "attributes": [
            string_attribute("rpc.system", "grpc"),
            string_attribute("rpc.service", "rigger.inference.v1.InferenceService"),
            string_attribute("rpc.method", call.rpc.method()),
            json!({ "key": "rpc.grpc.status_code", "value": { "intValue": (call.code as i32).to_string() } }),
            string_attribute("rigger.backend", call.backend),
        ],
        "status": { "code": if server_error(call.code) { STATUS_ERROR } else { STATUS_UNSET } },
    });
    if let Some(parent) = call.context.parent_span_id() {
        span["parentSpanId"] = json!(parent);
    }
    if let Some(state) = call.context.tracestate() {
        span["traceState"] = json!(state);
    }
    span
}

fn string_attribute(key: &str, value: &str) -> Value {
    json!({ "key": key, "value": { "stringValue": value } })
}

fn unix_nanos(at: SystemTime) -> u64 {
    at.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |since| since.as_nanos().try_into().unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_span_carries_its_trace_and_marks_server_errors_only() {
        let context = TraceContext::for_call(
            Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
            Some("rojo=1"),
            true,
        );
        let call = |code| FinishedCall {
            context: context.clone(),
            rpc: Rpc::DecomposeTask,
            backend: "embedded",
            start: SystemTime::UNIX_EPOCH + Duration::from_secs(1),
            duration: Duration::from_millis(250),
            code,
        };
        let body = request_body(
            "svc",
            &[
                call(Code::Ok),
                call(Code::InvalidArgument),
                call(Code::Unavailable),
            ],
        );
        let spans = &body["resourceSpans"][0]["scopeSpans"][0]["spans"];
        let first = &spans[0];
        assert_eq!(first["traceId"], "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(first["parentSpanId"], "00f067aa0ba902b7");
        assert_eq!(first["spanId"], context.span_id());
        assert_eq!(
            first["name"],
            "rigger.inference.v1.InferenceService/DecomposeTask"
        );
        assert_eq!(first["startTimeUnixNano"], "1000000000");
        assert_eq!(first["endTimeUnixNano"], "1250000000");
        assert_eq!(first["traceState"], "rojo=1");
        let statuses: Vec<&Value> = (0..3)
            .map(|index| &spans[index]["status"]["code"])
            .collect();
        assert_eq!(statuses, [&json!(0), &json!(0), &json!(2)]);
        assert_eq!(
            body["resourceSpans"][0]["resource"]["attributes"][0]["value"]["stringValue"],
            "svc"
        );
    }
}
