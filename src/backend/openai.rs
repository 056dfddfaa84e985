//! OpenAI-compatible servers (llama.cpp server, vLLM, mlx_lm.server):
//! `/v1/chat/completions` streamed as server-sent events, health from
//! `/v1/models`.

use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::{
    Backend, BackendError, Capabilities, Chunk, ChunkStream, Completion, EngineTimings,
    FinishReason, GenerationRequest, ProbeReport, SchemaSupport,
    http::{Framing, HttpTarget, RecordParser, WireMessage, WireSampling, relay},
    models::ModelCatalog,
};

const NAME: &str = "openai";

pub struct OpenAiBackend {
    client: reqwest::Client,
    base_url: String,
    api_key: Option<String>,
    probe_timeout: Duration,
    catalog: ModelCatalog,
}

pub struct OpenAiSettings {
    /// Base URL including the API prefix, e.g. `http://127.0.0.1:8080/v1`.
    pub base_url: String,
    pub api_key: Option<String>,
    pub model: Option<String>,
    pub probe_timeout: Duration,
}

impl OpenAiBackend {
    pub fn new(client: reqwest::Client, settings: OpenAiSettings) -> Self {
        Self {
            client,
            base_url: settings.base_url.trim_end_matches('/').to_owned(),
            api_key: settings.api_key.filter(|key| !key.is_empty()),
            probe_timeout: settings.probe_timeout,
            catalog: ModelCatalog::new(settings.model),
        }
    }

    fn target<'a>(&'a self, model: &'a str) -> HttpTarget<'a> {
        HttpTarget {
            backend: NAME,
            endpoint: &self.base_url,
            model,
        }
    }

    fn authorized(&self, request: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.api_key {
            Some(key) => request.bearer_auth(key),
            None => request,
        }
    }

    async fn list_models(&self) -> Result<Vec<String>, BackendError> {
        let target = self.target("");
        let request = self
            .client
            .get(format!("{}/models", self.base_url))
            .timeout(self.probe_timeout);
        let response = target.send(self.authorized(request)).await?;
        let list: ModelList = response
            .json()
            .await
            .map_err(|error| target.protocol(format!("/models: {error}")))?;
        Ok(list.data.into_iter().map(|model| model.id).collect())
    }

    /// The model to ask for. These servers often answer with whatever model
    /// they loaded whatever the request names, so an unknown name is refused
    /// here rather than silently served by another model.
    async fn resolve_model(&self, requested: Option<String>) -> Result<String, BackendError> {
        let served = |listed: &[String], model: &str| listed.iter().any(|name| name == model);
        let wanted = requested.or_else(|| self.catalog.default_model());
        if let Some(model) = &wanted
            && served(&self.catalog.listed(), model)
        {
            return Ok(model.clone());
        }
        let report = self.probe_listing().await?;
        match wanted.or(report.default_model) {
            Some(model) if served(&report.models, &model) => Ok(model),
            Some(model) => Err(BackendError::ModelNotFound {
                backend: NAME,
                model,
            }),
            None => Err(BackendError::NoDefaultModel { backend: NAME }),
        }
    }

    async fn probe_listing(&self) -> Result<ProbeReport, BackendError> {
        let models = self.list_models().await?;
        Ok(self.catalog.record(models))
    }
}

#[derive(Deserialize)]
struct ModelList {
    data: Vec<ModelEntry>,
}

#[derive(Deserialize)]
struct ModelEntry {
    id: String,
}

#[derive(Serialize)]
struct ChatRequest<'a> {
    model: &'a str,
    messages: Vec<WireMessage<'a>>,
    stream: bool,
    stream_options: Value,
    max_tokens: u32,
    #[serde(flatten)]
    sampling: WireSampling<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    response_format: Option<Value>,
}

#[derive(Deserialize)]
struct StreamChunk {
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    choices: Vec<StreamChoice>,
    #[serde(default)]
    usage: Option<StreamUsage>,
    /// llama.cpp's server adds its own timings next to the usage.
    #[serde(default)]
    timings: Option<LlamaTimings>,
    #[serde(default)]
    error: Option<Value>,
}

#[derive(Deserialize)]
struct StreamChoice {
    #[serde(default)]
    delta: Option<StreamDelta>,
    #[serde(default)]
    finish_reason: Option<String>,
}

#[derive(Deserialize)]
struct StreamDelta {
    #[serde(default)]
    content: Option<String>,
}

#[derive(Deserialize)]
struct StreamUsage {
    #[serde(default)]
    prompt_tokens: u32,
    #[serde(default)]
    completion_tokens: u32,
    #[serde(default)]
    prompt_tokens_details: Option<PromptTokensDetails>,
}

#[derive(Deserialize)]
struct PromptTokensDetails {
    #[serde(default)]
    cached_tokens: u32,
}

#[derive(Deserialize)]
struct LlamaTimings {
    prompt_ms: f64,
    predicted_ms: f64,
}

struct CompletionParser {
    model: String,
    finish_reason: Option<FinishReason>,
    usage: Option<StreamUsage>,
    engine_timings: Option<EngineTimings>,
}

/// A parser of an OpenAI-compatible stream, for the wire-format fuzz target.
#[cfg(any(test, fuzzing))]
pub(crate) fn record_parser() -> impl RecordParser {
    CompletionParser {
        model: "fuzz".to_owned(),
        finish_reason: None,
        usage: None,
        engine_timings: None,
    }
}

impl CompletionParser {
    fn completion(&mut self) -> Result<Chunk, BackendError> {
        let finish_reason = self.finish_reason.ok_or_else(|| BackendError::Protocol {
            backend: NAME,
            reason: "the stream ended without a finish_reason".to_owned(),
        })?;
        let usage = self.usage.take();
        Ok(Chunk::Done(Completion {
            backend: NAME,
            model: self.model.clone(),
            finish_reason,
            prompt_tokens: usage.as_ref().map_or(0, |usage| usage.prompt_tokens),
            completion_tokens: usage.as_ref().map_or(0, |usage| usage.completion_tokens),
            cached_prompt_tokens: usage
                .as_ref()
                .and_then(|usage| usage.prompt_tokens_details.as_ref())
                .map_or(0, |details| details.cached_tokens),
            engine_timings: self.engine_timings,
        }))
    }
}

fn millis(ms: f64) -> Duration {
    Duration::from_secs_f64(ms.max(0.0) / 1000.0)
}

impl RecordParser for CompletionParser {
    fn record(&mut self, record: &str) -> Result<Option<Chunk>, BackendError> {
        if record.trim() == "[DONE]" {
            return self.completion().map(Some);
        }
        let chunk: StreamChunk =
            serde_json::from_str(record).map_err(|error| BackendError::Protocol {
                backend: NAME,
                reason: format!("unreadable chat.completion.chunk: {error}"),
            })?;
        if let Some(error) = chunk.error {
            return Err(BackendError::Failed {
                backend: NAME,
                reason: super::http::error_message(&json!({ "error": error }).to_string()),
            });
        }
        if let Some(model) = chunk.model.filter(|model| !model.is_empty()) {
            self.model = model;
        }
        if let Some(usage) = chunk.usage {
            self.usage = Some(usage);
        }
        if let Some(timings) = chunk.timings {
            self.engine_timings = Some(EngineTimings {
                prompt: millis(timings.prompt_ms),
                generation: millis(timings.predicted_ms),
            });
        }
        let mut text = String::new();
        for choice in chunk.choices {
            if let Some(reason) = choice.finish_reason {
                self.finish_reason = Some(match reason.as_str() {
                    "length" => FinishReason::Length,
                    _ => FinishReason::Stop,
                });
            }
            if let Some(content) = choice.delta.and_then(|delta| delta.content) {
                text.push_str(&content);
            }
        }
        Ok((!text.is_empty()).then_some(Chunk::Text(text)))
    }

    fn end_of_body(&mut self) -> Result<Chunk, BackendError> {
        self.completion()
    }
}

#[async_trait]
impl Backend for OpenAiBackend {
    fn name(&self) -> &'static str {
        NAME
    }

    fn endpoint(&self) -> String {
        self.base_url.clone()
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            // Some servers (mlx_lm.server) accept response_format and ignore it.
            json_schema: SchemaSupport::Requested,
            seed: true,
            // The chat completions API has no n-gram ban.
            no_repeat: false,
            text_patterns: false,
        }
    }

    async fn probe(&self) -> Result<ProbeReport, BackendError> {
        let report = self.probe_listing().await?;
        if let Some(configured) = self.catalog.configured()
            && !report.models.iter().any(|model| model == configured)
        {
            return Err(BackendError::ModelNotFound {
                backend: NAME,
                model: configured.to_owned(),
            });
        }
        Ok(report)
    }

    async fn generate(&self, request: GenerationRequest) -> Result<ChunkStream, BackendError> {
        let model = self.resolve_model(request.model).await?;
        let body = ChatRequest {
            model: &model,
            messages: WireMessage::all(&request.messages),
            stream: true,
            stream_options: json!({ "include_usage": true }),
            max_tokens: request.sampling.max_tokens,
            sampling: WireSampling::new(&request.sampling, &request.stop),
            response_format: request.json_schema.map(|schema| {
                json!({
                    "type": "json_schema",
                    "json_schema": { "name": "output", "strict": true, "schema": schema },
                })
            }),
        };
        let target = self.target(&model);
        let request = self
            .client
            .post(format!("{}/chat/completions", self.base_url))
            .json(&body);
        let response = target.send(self.authorized(request)).await?;
        Ok(relay(
            &target,
            response,
            Framing::Sse,
            CompletionParser {
                model: model.clone(),
                finish_reason: None,
                usage: None,
                engine_timings: None,
            },
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_arrives_after_the_finish_reason_and_is_kept() {
        let mut parser = CompletionParser {
            model: "m".into(),
            finish_reason: None,
            usage: None,
            engine_timings: None,
        };
        let text = parser
            .record(r#"{"choices":[{"index":0,"delta":{"content":"Hi"},"finish_reason":null}],"model":"m"}"#)
            .unwrap();
        assert_eq!(text, Some(Chunk::Text("Hi".into())));
        assert_eq!(
            parser
                .record(r#"{"choices":[{"index":0,"delta":{},"finish_reason":"length"}]}"#)
                .unwrap(),
            None
        );
        assert_eq!(
            parser
                .record(r#"{"choices":[],"usage":{"prompt_tokens":9,"completion_tokens":4,"prompt_tokens_details":{"cached_tokens":5}},"timings":{"prompt_ms":10.0,"predicted_ms":40.0}}"#)
                .unwrap(),
            None
        );
        let done = parser.record("[DONE]").unwrap();
        assert_eq!(
            done,
            Some(Chunk::Done(Completion {
                backend: NAME,
                model: "m".into(),
                finish_reason: FinishReason::Length,
                prompt_tokens: 9,
                completion_tokens: 4,
                cached_prompt_tokens: 5,
                engine_timings: Some(EngineTimings {
                    prompt: Duration::from_millis(10),
                    generation: Duration::from_millis(40),
                }),
            }))
        );
    }

    #[test]
    fn a_stream_cut_before_any_finish_reason_is_an_error() {
        let mut parser = CompletionParser {
            model: "m".into(),
            finish_reason: None,
            usage: None,
            engine_timings: None,
        };
        assert!(parser.end_of_body().is_err());
    }
}
