//! Ollama over its HTTP API: `/api/chat` streamed as NDJSON, health from
//! `/api/version` and `/api/tags`, the models it holds from `/api/ps`, and
//! loading and unloading through `/api/generate` without a prompt.

use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{
    Backend, BackendError, Capabilities, Chunk, ChunkStream, Completion, EngineTimings,
    FinishReason, GenerationRequest, ModelInfo, ProbeReport, Residence, ResidencyError,
    SchemaSupport,
    http::{Framing, HttpTarget, RecordParser, WireMessage, WireSampling, relay},
    models::ModelCatalog,
};

const NAME: &str = "ollama";
const DEFAULT_PORT: u16 = 11434;

pub struct OllamaBackend {
    client: reqwest::Client,
    base_url: String,
    keep_alive: Option<Value>,
    probe_timeout: Duration,
    catalog: ModelCatalog,
}

pub struct OllamaSettings {
    /// `OLLAMA_HOST` as Ollama accepts it: `host`, `host:port` or a URL.
    pub host: String,
    pub model: Option<String>,
    /// Ollama's `keep_alive`: a duration string, or seconds.
    pub keep_alive: Option<String>,
    pub probe_timeout: Duration,
}

impl OllamaBackend {
    pub fn new(client: reqwest::Client, settings: OllamaSettings) -> Self {
        Self {
            client,
            base_url: base_url_from_host(&settings.host),
            keep_alive: settings.keep_alive.map(|value| keep_alive_value(&value)),
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

    async fn get_json<T: for<'de> Deserialize<'de>>(&self, path: &str) -> Result<T, BackendError> {
        let target = self.target("");
        let request = self
            .client
            .get(format!("{}{path}", self.base_url))
            .timeout(self.probe_timeout);
        let response = target.send(request).await?;
        response
            .json()
            .await
            .map_err(|error| target.protocol(format!("{path}: {error}")))
    }

    /// The models Ollama holds in memory now.
    async fn running(&self) -> Result<Vec<RunningModel>, BackendError> {
        let running: RunningResponse = self.get_json("/api/ps").await?;
        Ok(running.models)
    }

    /// Loads or unloads `model` through `/api/generate` without a prompt,
    /// which Ollama answers with one JSON object, `done` and the reason
    /// (`load`, `unload`).
    async fn set_loaded(
        &self,
        model: &str,
        keep_alive: Option<&Value>,
        reason: &str,
    ) -> Result<(), BackendError> {
        let target = self.target(model);
        let response = target
            .send(
                self.client
                    .post(format!("{}/api/generate", self.base_url))
                    .json(&LoadRequest { model, keep_alive }),
            )
            .await?;
        let answer: LoadAnswer = response
            .json()
            .await
            .map_err(|error| target.protocol(format!("/api/generate: {error}")))?;
        // The documented answer to a load has no `done_reason`; Ollama's
        // server sends `load`.
        let expected = answer
            .done_reason
            .as_deref()
            .is_none_or(|given| given == reason);
        if answer.done && expected {
            Ok(())
        } else {
            Err(target.protocol(format!(
                "/api/generate answered a {reason} with done={} done_reason={:?}",
                answer.done, answer.done_reason
            )))
        }
    }

    /// The `keep_alive` a load sends: the configured one, except zero,
    /// which Ollama reads as "unload" when there is no prompt. Without it
    /// the model stays for Ollama's default until its next call, which the
    /// zero then unloads after: as a model loaded ahead of its calls under
    /// `--keep-alive 0` on the backends that hold models themselves.
    fn load_keep_alive(&self) -> Option<&Value> {
        self.keep_alive
            .as_ref()
            .filter(|value| !unloads_at_once(value))
    }
}

/// Normalizes `OLLAMA_HOST` the way Ollama reads it: scheme defaults to
/// http, port to 11434.
pub fn base_url_from_host(host: &str) -> String {
    let host = host.trim().trim_end_matches('/');
    let (scheme, rest) = match host.split_once("://") {
        Some((scheme, rest)) => (scheme, rest),
        None => ("http", host),
    };
    let has_port = rest
        .rsplit_once(':')
        .is_some_and(|(_, port)| port.parse::<u16>().is_ok());
    if has_port {
        format!("{scheme}://{rest}")
    } else {
        format!("{scheme}://{rest}:{DEFAULT_PORT}")
    }
}

fn keep_alive_value(value: &str) -> Value {
    value
        .parse::<i64>()
        .map_or_else(|_| Value::from(value), Value::from)
}

/// Whether a `keep_alive` is zero: `0`, or a duration string whose digits
/// are all zero (`0s`, `0m`).
fn unloads_at_once(value: &Value) -> bool {
    match value {
        Value::Number(number) => number.as_f64() == Some(0.0),
        Value::String(text) => {
            text.chars().any(|c| c.is_ascii_digit())
                && !text.chars().any(|c| matches!(c, '1'..='9'))
        }
        _ => false,
    }
}

/// Whether a model list from `/api/tags` holds `model`; Ollama reads a name
/// without a tag as `:latest`.
fn lists_model(models: &[String], model: &str) -> bool {
    models
        .iter()
        .any(|listed| listed == model || listed.strip_suffix(":latest") == Some(model))
}

#[derive(Serialize)]
struct ChatRequest<'a> {
    model: &'a str,
    messages: Vec<WireMessage<'a>>,
    stream: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    format: Option<&'a Value>,
    options: ChatOptions<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    keep_alive: Option<&'a Value>,
}

#[derive(Serialize)]
struct ChatOptions<'a> {
    num_predict: u32,
    #[serde(flatten)]
    sampling: WireSampling<'a>,
}

#[derive(Deserialize)]
struct ChatLine {
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    message: Option<ChatLineMessage>,
    #[serde(default)]
    done: bool,
    #[serde(default)]
    done_reason: Option<String>,
    #[serde(default)]
    prompt_eval_count: Option<u32>,
    #[serde(default)]
    eval_count: Option<u32>,
    #[serde(default)]
    prompt_eval_duration: Option<u64>,
    #[serde(default)]
    eval_duration: Option<u64>,
    #[serde(default)]
    error: Option<String>,
}

#[derive(Deserialize)]
struct ChatLineMessage {
    #[serde(default)]
    content: String,
}

#[derive(Deserialize)]
struct VersionResponse {
    version: String,
}

#[derive(Deserialize)]
struct TagsResponse {
    models: Vec<TagsModel>,
}

#[derive(Deserialize)]
struct TagsModel {
    name: String,
}

/// `/api/generate` without a prompt: loads the model, or unloads it when
/// `keep_alive` is zero.
#[derive(Serialize)]
struct LoadRequest<'a> {
    model: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    keep_alive: Option<&'a Value>,
}

#[derive(Deserialize)]
struct LoadAnswer {
    #[serde(default)]
    done: bool,
    #[serde(default)]
    done_reason: Option<String>,
}

#[derive(Deserialize)]
struct RunningResponse {
    models: Vec<RunningModel>,
}

/// A model `/api/ps` lists as loaded.
#[derive(Deserialize)]
struct RunningModel {
    name: String,
    /// Bytes the loaded model takes (weights, KV cache, graph), RAM and
    /// VRAM together.
    size: u64,
}

impl RunningModel {
    /// Its residence as far as Ollama tells: the memory it takes. Ollama
    /// reports no calls in use, pins nothing, and gives an expiry where a
    /// residence has a last use, so those stay unset.
    fn residence(&self) -> Residence {
        Residence {
            model: self.name.clone(),
            loading: false,
            memory_bytes: self.size,
            in_use: 0,
            pinned: false,
            last_used: None,
            load_time: None,
        }
    }
}

struct ChatParser {
    model: String,
}

/// A parser of an Ollama chat stream, for the wire-format fuzz target.
#[cfg(any(test, fuzzing))]
pub(crate) fn record_parser() -> impl RecordParser {
    ChatParser {
        model: "fuzz".to_owned(),
    }
}

impl RecordParser for ChatParser {
    fn record(&mut self, record: &str) -> Result<Option<Chunk>, BackendError> {
        let line: ChatLine =
            serde_json::from_str(record).map_err(|error| BackendError::Protocol {
                backend: NAME,
                reason: format!("unreadable /api/chat line: {error}"),
            })?;
        if let Some(reason) = line.error {
            return Err(BackendError::Failed {
                backend: NAME,
                reason,
            });
        }
        if line.done {
            let finish_reason = match line.done_reason.as_deref() {
                Some("length") => FinishReason::Length,
                _ => FinishReason::Stop,
            };
            return Ok(Some(Chunk::Done(Completion {
                backend: NAME,
                model: line.model.unwrap_or_else(|| self.model.clone()),
                finish_reason,
                prompt_tokens: line.prompt_eval_count.unwrap_or(0),
                completion_tokens: line.eval_count.unwrap_or(0),
                cached_prompt_tokens: 0,
                // Ollama reports durations in nanoseconds.
                engine_timings: line.prompt_eval_duration.zip(line.eval_duration).map(
                    |(prompt, generation)| EngineTimings {
                        prompt: Duration::from_nanos(prompt),
                        generation: Duration::from_nanos(generation),
                    },
                ),
            })));
        }
        Ok(line
            .message
            .filter(|message| !message.content.is_empty())
            .map(|message| Chunk::Text(message.content)))
    }

    fn end_of_body(&mut self) -> Result<Chunk, BackendError> {
        Err(BackendError::Protocol {
            backend: NAME,
            reason: "the /api/chat stream ended without its final `done` line".to_owned(),
        })
    }
}

#[async_trait]
impl Backend for OllamaBackend {
    /// Ollama reads a name without a tag as `:latest`.
    fn serves(&self, listed: &[String], model: &str) -> bool {
        lists_model(listed, model)
    }

    fn name(&self) -> &'static str {
        NAME
    }

    fn endpoint(&self) -> String {
        self.base_url.clone()
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            // Ollama compiles a `format` schema into a llama.cpp grammar.
            json_schema: SchemaSupport::Enforced,
            seed: true,
            // Ollama's options have no n-gram ban.
            no_repeat: false,
            text_patterns: false,
        }
    }

    async fn probe(&self) -> Result<ProbeReport, BackendError> {
        let version: VersionResponse = self.get_json("/api/version").await?;
        tracing::debug!(version = %version.version, "ollama answered");
        let tags: TagsResponse = self.get_json("/api/tags").await?;
        let models: Vec<String> = tags.models.into_iter().map(|model| model.name).collect();
        if let Some(configured) = self.catalog.configured()
            && !lists_model(&models, configured)
        {
            return Err(BackendError::ModelNotFound {
                backend: NAME,
                model: configured.to_owned(),
            });
        }
        Ok(self.catalog.record(models))
    }

    async fn generate(&self, request: GenerationRequest) -> Result<ChunkStream, BackendError> {
        let model = match request.model {
            Some(model) => model,
            None => match self.catalog.default_model() {
                Some(model) => model,
                None => self
                    .probe()
                    .await?
                    .default_model
                    .ok_or(BackendError::NoDefaultModel { backend: NAME })?,
            },
        };
        let body = ChatRequest {
            model: &model,
            messages: WireMessage::all(&request.messages),
            stream: true,
            format: request.json_schema.as_ref(),
            options: ChatOptions {
                num_predict: request.sampling.max_tokens,
                sampling: WireSampling::new(&request.sampling, &request.stop),
            },
            keep_alive: self.keep_alive.as_ref(),
        };
        let target = self.target(&model);
        let response = target
            .send(
                self.client
                    .post(format!("{}/api/chat", self.base_url))
                    .json(&body),
            )
            .await?;
        Ok(relay(
            &target,
            response,
            Framing::Ndjson,
            ChatParser {
                model: model.clone(),
            },
        ))
    }

    /// The pulled models (`/api/tags`), each with its residence when
    /// `/api/ps` lists it.
    async fn models(&self) -> Result<Vec<ModelInfo>, BackendError> {
        let (report, running) = futures_util::try_join!(self.probe(), self.running())?;
        Ok(report
            .models
            .into_iter()
            .map(|name| ModelInfo {
                residence: running
                    .iter()
                    .find(|loaded| loaded.name == name)
                    .map(RunningModel::residence),
                ..ModelInfo::named(name)
            })
            .collect())
    }

    async fn load_model(&self, model: &str) -> Result<(), BackendError> {
        self.set_loaded(model, self.load_keep_alive(), "load").await
    }

    /// Ollama answers the unload of a model it does not hold as a success;
    /// here it is `MODEL_NOT_LOADED`, as on the backends that hold models
    /// themselves, so a caller learns that nothing was freed.
    async fn unload_model(&self, model: &str) -> Result<(), BackendError> {
        let running: Vec<String> = self
            .running()
            .await?
            .into_iter()
            .map(|loaded| loaded.name)
            .collect();
        if !lists_model(&running, model) {
            return Err(BackendError::Residency {
                backend: NAME,
                error: ResidencyError::NotLoaded {
                    model: model.to_owned(),
                },
            });
        }
        self.set_loaded(model, Some(&Value::from(0)), "unload")
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ollama_host_forms_normalize_like_ollama_reads_them() {
        assert_eq!(base_url_from_host("127.0.0.1"), "http://127.0.0.1:11434");
        assert_eq!(base_url_from_host("0.0.0.0:8000"), "http://0.0.0.0:8000");
        assert_eq!(
            base_url_from_host("https://ollama.example/"),
            "https://ollama.example:11434"
        );
        assert_eq!(
            base_url_from_host("http://[::1]:11434"),
            "http://[::1]:11434"
        );
    }

    #[test]
    fn untagged_names_match_latest() {
        let models = vec!["llama3.1:latest".to_owned(), "qwen2.5:7b".to_owned()];
        assert!(lists_model(&models, "llama3.1"));
        assert!(lists_model(&models, "qwen2.5:7b"));
        assert!(!lists_model(&models, "qwen2.5"));
    }

    #[test]
    fn keep_alive_numbers_are_sent_as_numbers() {
        assert_eq!(keep_alive_value("-1"), Value::from(-1));
        assert_eq!(keep_alive_value("5m"), Value::from("5m"));
    }

    #[test]
    fn only_a_zero_keep_alive_unloads_at_once() {
        for zero in [
            Value::from(0),
            Value::from("0"),
            Value::from("0s"),
            Value::from("0m0s"),
        ] {
            assert!(unloads_at_once(&zero), "{zero}");
        }
        for kept in [
            Value::from(-1),
            Value::from(300),
            Value::from("5m"),
            Value::from("10s"),
        ] {
            assert!(!unloads_at_once(&kept), "{kept}");
        }
    }

    #[test]
    fn final_line_carries_usage_and_reason() {
        let mut parser = ChatParser { model: "m".into() };
        let text = parser
            .record(r#"{"model":"m","created_at":"t","message":{"role":"assistant","content":"Hi"},"done":false}"#)
            .unwrap();
        assert_eq!(text, Some(Chunk::Text("Hi".into())));
        let done = parser
            .record(r#"{"model":"m","created_at":"t","message":{"role":"assistant","content":""},"done":true,"done_reason":"length","total_duration":5,"prompt_eval_count":7,"prompt_eval_duration":2000000,"eval_count":3,"eval_duration":1500000000}"#)
            .unwrap();
        assert_eq!(
            done,
            Some(Chunk::Done(Completion {
                backend: NAME,
                model: "m".into(),
                finish_reason: FinishReason::Length,
                prompt_tokens: 7,
                completion_tokens: 3,
                cached_prompt_tokens: 0,
                engine_timings: Some(EngineTimings {
                    prompt: Duration::from_millis(2),
                    generation: Duration::from_millis(1500),
                }),
            }))
        );
        let error = parser.record(r#"{"error":"runner crashed"}"#).unwrap_err();
        assert!(error.to_string().contains("runner crashed"));
    }
}
