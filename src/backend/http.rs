//! What the HTTP backends share: sending a request with uniform error
//! mapping, and turning a streamed body (NDJSON or server-sent events) into a
//! [`ChunkStream`] through a per-backend record parser.

use std::{collections::VecDeque, pin::Pin};

use bytes::Bytes;
use futures_util::{Stream, StreamExt, stream};
use opentelemetry::{
    Context,
    propagation::{Injector, TextMapPropagator},
};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};

use super::{BackendError, Chunk, ChunkStream, Message, Sampling};

/// Longest line accepted from a backend; a longer one is a protocol error,
/// not unbounded buffering.
const MAX_LINE_BYTES: usize = 1024 * 1024;

/// How a streamed body is cut into records.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Framing {
    /// One JSON document per line (Ollama).
    Ndjson,
    /// Server-sent events; a record is one event's `data` (OpenAI-compatible).
    Sse,
}

/// Turns the records of one backend's stream into chunks.
pub(crate) trait RecordParser: Send + 'static {
    /// Parses one record. `Some(Chunk::Done(_))` ends the stream.
    fn record(&mut self, record: &str) -> Result<Option<Chunk>, BackendError>;
    /// Called when the body ends without a [`Chunk::Done`].
    fn end_of_body(&mut self) -> Result<Chunk, BackendError>;
}

/// A chat message as both Ollama and OpenAI-compatible APIs take it.
#[derive(serde::Serialize)]
pub(crate) struct WireMessage<'a> {
    role: &'static str,
    content: &'a str,
}

impl<'a> WireMessage<'a> {
    pub(crate) fn all(messages: &'a [Message]) -> Vec<Self> {
        messages
            .iter()
            .map(|message| Self {
                role: message.role.as_str(),
                content: &message.content,
            })
            .collect()
    }
}

/// The sampling fields both Ollama (`options`) and OpenAI-compatible APIs
/// take under the same names; the token limit is named differently by each.
#[derive(serde::Serialize)]
pub(crate) struct WireSampling<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    temperature: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    top_p: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    seed: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    frequency_penalty: Option<f32>,
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    stop: &'a [String],
}

impl<'a> WireSampling<'a> {
    pub(crate) fn new(sampling: &Sampling, stop: &'a [String]) -> Self {
        Self {
            temperature: sampling.temperature,
            top_p: sampling.top_p,
            seed: sampling.seed,
            frequency_penalty: sampling.frequency_penalty,
            stop,
        }
    }
}

/// The backend-specific part of mapping an HTTP error to [`BackendError`].
pub(crate) struct HttpTarget<'a> {
    pub backend: &'static str,
    pub endpoint: &'a str,
    pub model: &'a str,
}

impl HttpTarget<'_> {
    /// Sends a request, within the trace of the call it serves (W3C
    /// `traceparent`/`tracestate` naming the call's span as the parent); a
    /// transport failure or a non-success status becomes the matching
    /// [`BackendError`], with the backend's own message.
    pub(crate) async fn send(
        &self,
        request: reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, BackendError> {
        let mut trace = HeaderMap::new();
        TraceContextPropagator::new()
            .inject_context(&Context::current(), &mut TraceHeaders(&mut trace));
        let response = request
            .headers(trace)
            .send()
            .await
            .map_err(|error| self.transport(error))?;
        let status = response.status();
        if status.is_success() {
            return Ok(response);
        }
        let body = response.text().await.unwrap_or_default();
        Err(self.status_error(status, &error_message(&body)))
    }

    pub(crate) fn transport(&self, error: reqwest::Error) -> BackendError {
        BackendError::Unavailable {
            backend: self.backend,
            endpoint: self.endpoint.to_owned(),
            reason: describe(&error),
        }
    }

    pub(crate) fn status_error(&self, status: reqwest::StatusCode, message: &str) -> BackendError {
        use reqwest::StatusCode;
        let reason = format!("HTTP {}: {message}", status.as_u16());
        match status {
            StatusCode::NOT_FOUND => BackendError::ModelNotFound {
                backend: self.backend,
                model: self.model.to_owned(),
            },
            StatusCode::SERVICE_UNAVAILABLE | StatusCode::TOO_MANY_REQUESTS => BackendError::Busy {
                backend: self.backend,
                reason,
            },
            StatusCode::BAD_REQUEST | StatusCode::UNPROCESSABLE_ENTITY => BackendError::Rejected {
                backend: self.backend,
                reason,
            },
            StatusCode::BAD_GATEWAY | StatusCode::GATEWAY_TIMEOUT => BackendError::Unavailable {
                backend: self.backend,
                endpoint: self.endpoint.to_owned(),
                reason,
            },
            _ => BackendError::Failed {
                backend: self.backend,
                reason,
            },
        }
    }

    pub(crate) fn protocol(&self, reason: impl Into<String>) -> BackendError {
        BackendError::Protocol {
            backend: self.backend,
            reason: reason.into(),
        }
    }
}

/// The error text of a backend's error body: `{"error": "…"}` (Ollama),
/// `{"error": {"message": "…"}}` (OpenAI), or the body itself.
pub(crate) fn error_message(body: &str) -> String {
    let parsed: Option<serde_json::Value> = serde_json::from_str(body).ok();
    let error = parsed.as_ref().and_then(|value| value.get("error"));
    match error {
        Some(serde_json::Value::String(message)) => message.clone(),
        Some(object) => object
            .get("message")
            .and_then(serde_json::Value::as_str)
            .map_or_else(|| object.to_string(), str::to_owned),
        None => body.trim().chars().take(512).collect(),
    }
}

fn describe(error: &reqwest::Error) -> String {
    let kind = if error.is_timeout() {
        "timed out"
    } else if error.is_connect() {
        "connection failed"
    } else {
        "request failed"
    };
    let mut text = format!("{kind}: {error}");
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Streams a response body through `parser`. Lazy: nothing is read until the
/// stream is polled, and dropping the stream drops the HTTP response.
pub(crate) fn relay<P: RecordParser>(
    target: &HttpTarget<'_>,
    response: reqwest::Response,
    framing: Framing,
    parser: P,
) -> ChunkStream {
    let state = RelayState {
        backend: target.backend,
        endpoint: target.endpoint.to_owned(),
        body: Box::pin(response.bytes_stream().fuse()),
        records: RecordSplitter::new(framing),
        pending: VecDeque::new(),
        parser,
        finished: false,
    };
    Box::pin(stream::unfold(state, |mut state| async move {
        let item = state.next_chunk().await?;
        state.finished = matches!(item, Ok(Chunk::Done(_)) | Err(_));
        Some((item, state))
    }))
}

type Body = Pin<Box<dyn Stream<Item = Result<Bytes, reqwest::Error>> + Send>>;

struct RelayState<P> {
    backend: &'static str,
    endpoint: String,
    body: Body,
    records: RecordSplitter,
    pending: VecDeque<String>,
    parser: P,
    finished: bool,
}

impl<P: RecordParser> RelayState<P> {
    async fn next_chunk(&mut self) -> Option<Result<Chunk, BackendError>> {
        if self.finished {
            return None;
        }
        loop {
            while let Some(record) = self.pending.pop_front() {
                match self.parser.record(&record) {
                    Ok(Some(chunk)) => return Some(Ok(chunk)),
                    Ok(None) => {}
                    Err(error) => return Some(Err(error)),
                }
            }
            match self.body.next().await {
                Some(Ok(bytes)) => match self.records.push(&bytes) {
                    Ok(records) => self.pending.extend(records),
                    Err(reason) => {
                        return Some(Err(BackendError::Protocol {
                            backend: self.backend,
                            reason,
                        }));
                    }
                },
                Some(Err(error)) => {
                    return Some(Err(BackendError::Unavailable {
                        backend: self.backend,
                        endpoint: self.endpoint.clone(),
                        reason: format!("stream interrupted: {}", describe(&error)),
                    }));
                }
                None => {
                    let rest = self.records.finish();
                    if rest.is_empty() {
                        return Some(self.parser.end_of_body());
                    }
                    self.pending.extend(rest);
                }
            }
        }
    }
}

/// Feeds `records` to `parser` until one ends the stream or fails, then
/// ends the body: the entry point of the wire-format fuzz target.
#[cfg(any(test, fuzzing))]
pub(crate) fn parse_all(
    mut parser: impl RecordParser,
    records: &[String],
) -> Vec<Result<Option<Chunk>, BackendError>> {
    let mut parsed = Vec::new();
    for record in records {
        let result = parser.record(record);
        let last = !matches!(result, Ok(None) | Ok(Some(Chunk::Text(_))));
        parsed.push(result);
        if last {
            return parsed;
        }
    }
    parsed.push(parser.end_of_body().map(Some));
    parsed
}

/// Cuts a byte stream into records according to a [`Framing`].
#[derive(Debug)]
pub(crate) struct RecordSplitter {
    framing: Framing,
    line: Vec<u8>,
    event_data: Option<String>,
}

impl RecordSplitter {
    pub(crate) fn new(framing: Framing) -> Self {
        Self {
            framing,
            line: Vec::new(),
            event_data: None,
        }
    }

    /// Feeds bytes; returns the records they complete.
    pub(crate) fn push(&mut self, bytes: &[u8]) -> Result<Vec<String>, String> {
        let mut records = Vec::new();
        for &byte in bytes {
            if byte == b'\n' {
                let line = std::mem::take(&mut self.line);
                let line = String::from_utf8(line)
                    .map_err(|_| "a line of the stream is not UTF-8".to_owned())?;
                self.line_done(line.strip_suffix('\r').unwrap_or(&line), &mut records);
            } else {
                if self.line.len() >= MAX_LINE_BYTES {
                    return Err(format!(
                        "a line of the stream exceeds {MAX_LINE_BYTES} bytes"
                    ));
                }
                self.line.push(byte);
            }
        }
        Ok(records)
    }

    /// Ends the stream: returns a last unterminated record, if any.
    pub(crate) fn finish(&mut self) -> Vec<String> {
        let mut records = Vec::new();
        if !self.line.is_empty() {
            let line = String::from_utf8_lossy(&std::mem::take(&mut self.line)).into_owned();
            self.line_done(&line, &mut records);
        }
        if let Some(data) = self.event_data.take() {
            records.push(data);
        }
        records
    }

    fn line_done(&mut self, line: &str, records: &mut Vec<String>) {
        match self.framing {
            Framing::Ndjson => {
                if !line.trim().is_empty() {
                    records.push(line.to_owned());
                }
            }
            Framing::Sse => {
                if line.is_empty() {
                    records.extend(self.event_data.take());
                } else if let Some(data) = line.strip_prefix("data:") {
                    let data = data.strip_prefix(' ').unwrap_or(data);
                    match &mut self.event_data {
                        Some(existing) => {
                            existing.push('\n');
                            existing.push_str(data);
                        }
                        None => self.event_data = Some(data.to_owned()),
                    }
                }
            }
        }
    }
}

/// The trace headers of a backend request; an empty `tracestate` (a trace
/// this service started) is not sent.
struct TraceHeaders<'a>(&'a mut HeaderMap);

impl Injector for TraceHeaders<'_> {
    fn set(&mut self, key: &str, value: String) {
        if value.is_empty() {
            return;
        }
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(key.as_bytes()),
            HeaderValue::from_str(&value),
        ) {
            self.0.insert(name, value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ndjson_records_survive_arbitrary_chunk_boundaries() {
        let body = b"{\"a\":1}\n\n{\"b\":\"\xc3\xa9\"}\r\n{\"c\":3}";
        for cut in 0..body.len() {
            let mut splitter = RecordSplitter::new(Framing::Ndjson);
            let mut records = splitter.push(&body[..cut]).unwrap();
            records.extend(splitter.push(&body[cut..]).unwrap());
            records.extend(splitter.finish());
            assert_eq!(
                records,
                ["{\"a\":1}", "{\"b\":\"é\"}", "{\"c\":3}"],
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn sse_joins_multiline_data_and_skips_comments_and_fields() {
        let mut splitter = RecordSplitter::new(Framing::Sse);
        let records = splitter
            .push(b": ping\nevent: chunk\ndata: {\"x\":\ndata: 1}\n\ndata: [DONE]\n\n")
            .unwrap();
        assert_eq!(records, ["{\"x\":\n1}", "[DONE]"]);
    }

    #[test]
    fn an_endless_line_is_an_error_not_unbounded_memory() {
        let mut splitter = RecordSplitter::new(Framing::Ndjson);
        let error = splitter.push(&vec![b'x'; MAX_LINE_BYTES + 1]).unwrap_err();
        assert!(error.contains("exceeds"), "{error}");
    }

    #[test]
    fn error_bodies_of_both_dialects_yield_their_message() {
        assert_eq!(
            error_message(r#"{"error":"model \"x\" not found"}"#),
            "model \"x\" not found"
        );
        assert_eq!(
            error_message(r#"{"error":{"code":400,"message":"bad max_tokens"}}"#),
            "bad max_tokens"
        );
        assert_eq!(error_message("plain failure\n"), "plain failure");
    }
}
