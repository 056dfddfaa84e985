//! One resident model of the embedded engine: the llama.cpp model, its chat
//! template and grammar factory, and its own engine thread (sequences,
//! queue and prefix cache), so models never wait on each other's steps.

use std::{
    io::Read,
    path::{Path, PathBuf},
    sync::{
        Arc, OnceLock,
        atomic::{AtomicU64, Ordering},
    },
    time::{Instant, SystemTime, UNIX_EPOCH},
};

use llama_cpp_2::{
    llama_backend::LlamaBackend,
    model::{LlamaChatMessage, LlamaChatTemplate, LlamaModel, params::LlamaModelParams},
    sampling::LlamaSampler,
};
use llguidance::{Matcher, ParserFactory, api::TopLevelGrammar};

use super::{
    NAME,
    device::{GpuLayers, compute_device},
    engine::{EngineShape, EngineThread, Job, Refused},
    sampler::Sampler,
    text::TextAssembler,
};
use crate::backend::{
    BackendError, ChunkStream, GenerationRequest,
    relay::{RELAY_CAPACITY, relay},
};

const GGUF_MAGIC: &[u8; 4] = b"GGUF";
/// llama.cpp's defaults, used when a request leaves them unset.
const DEFAULT_TEMPERATURE: f32 = 0.8;
const DEFAULT_TOP_P: f32 = 0.95;

pub(super) struct LoadedModel {
    model: Arc<LlamaModel>,
    name: String,
    path: PathBuf,
    template: LlamaChatTemplate,
    grammars: ParserFactory,
    engine: EngineThread,
    shape: EngineShape,
    queue: usize,
}

/// llama.cpp's backends, initialised once per process.
pub(super) fn llama() -> Result<&'static LlamaBackend, String> {
    static LLAMA: OnceLock<Result<LlamaBackend, String>> = OnceLock::new();
    LLAMA
        .get_or_init(|| {
            llama_cpp_2::send_logs_to_tracing(llama_cpp_2::LogOptions::default());
            LlamaBackend::init().map_err(|error| error.to_string())
        })
        .as_ref()
        .map_err(Clone::clone)
}

impl LoadedModel {
    /// Loads the model, starts its engine thread and runs a one-token
    /// warm-up; blocks until the model is ready.
    pub(super) fn load(
        name: &str,
        path: &Path,
        shape: EngineShape,
        gpu_layers: GpuLayers,
        queue: usize,
    ) -> Result<Self, String> {
        check_gguf(path)?;
        let started = Instant::now();
        let llama = llama()?;
        // llama.cpp's default offloads every layer.
        let params = match gpu_layers {
            GpuLayers::All => LlamaModelParams::default(),
            GpuLayers::Count(layers) => LlamaModelParams::default().with_n_gpu_layers(layers),
        };
        let model = LlamaModel::load_from_file(llama, path, &params)
            .map_err(|error| format!("llama.cpp could not load it: {error}"))?;
        let model = Arc::new(model);
        let template = model
            .chat_template(None)
            .map_err(|error| format!("no chat template in the GGUF: {error}"))?;
        let grammars = ParserFactory::new_simple(&LlamaSampler::llguidance_tok_env(&model))
            .map_err(|error| format!("llguidance: {error}"))?;
        let (engine, warm_up) = EngineThread::start(model.clone(), llama, shape, queue)?;
        tracing::info!(
            path = %path.display(),
            model = name,
            architecture = %model.meta_val_str("general.architecture").unwrap_or_default(),
            parameters = model.n_params(),
            size_bytes = model.size(),
            context_length = model.n_ctx_train(),
            load_ms = started.elapsed().as_millis() as u64,
            warm_up_ms = warm_up.as_millis() as u64,
            sequences = shape.parallel,
            ctx_per_sequence = shape.ctx_per_sequence,
            threads = shape.threads,
            gpu_layers = %gpu_layers,
            device = compute_device(gpu_layers).map(|device| device.name).unwrap_or_default(),
            "embedded model loaded"
        );
        Ok(Self {
            model,
            name: name.to_owned(),
            path: path.to_owned(),
            template,
            grammars,
            engine,
            shape,
            queue,
        })
    }

    pub(super) fn is_alive(&self) -> bool {
        self.engine.is_alive()
    }

    fn rejected(reason: String) -> BackendError {
        BackendError::Rejected {
            backend: NAME,
            reason,
        }
    }

    fn prompt(
        &self,
        request: &GenerationRequest,
    ) -> Result<Vec<llama_cpp_2::token::LlamaToken>, BackendError> {
        let messages = request
            .messages
            .iter()
            .map(|message| {
                LlamaChatMessage::new(message.role.as_str().to_owned(), message.content.clone())
                    .map_err(|_| Self::rejected("a message contains a NUL character".to_owned()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let prompt = self
            .model
            .apply_chat_template(&self.template, &messages, true)
            .map_err(|error| Self::rejected(format!("chat template: {error}")))?;
        let tokens = self.model.vocab().tokenize(prompt.as_bytes(), true, true);
        let room = self.shape.ctx_per_sequence as usize;
        if tokens.len() >= room {
            return Err(Self::rejected(format!(
                "the prompt has {} tokens; a sequence holds at most {room} (RIGGER_CTX_PER_SEQUENCE), \
                 and at least one must be left to generate",
                tokens.len()
            )));
        }
        Ok(tokens)
    }

    fn matcher(&self, schema: &serde_json::Value) -> Result<Matcher, BackendError> {
        let mut schema = schema.clone();
        if let Some(object) = schema.as_object_mut() {
            // Compact JSON: fewer tokens for the same answer.
            object
                .entry("x-guidance")
                .or_insert_with(|| serde_json::json!({ "whitespace_flexible": false }));
        }
        let grammar = TopLevelGrammar::from_json_schema(schema);
        let parser = self
            .grammars
            .create_parser(grammar)
            .map_err(|error| Self::rejected(format!("json_schema cannot be enforced: {error}")))?;
        let matcher = Matcher::new(Ok(parser));
        match matcher.get_error() {
            Some(error) => Err(Self::rejected(format!(
                "json_schema cannot be enforced: {error}"
            ))),
            None => Ok(matcher),
        }
    }

    fn sampler(&self, request: &GenerationRequest) -> Sampler {
        let sampling = &request.sampling;
        Sampler::new(
            sampling.temperature.unwrap_or(DEFAULT_TEMPERATURE),
            sampling.top_p.unwrap_or(DEFAULT_TOP_P),
            sampling.frequency_penalty.unwrap_or(0.0),
            sampling.seed.unwrap_or_else(fresh_seed),
        )
        .avoiding_repeated_ngrams(sampling.no_repeat.as_ref().map(|rule| {
            let said = rule
                .already_said
                .iter()
                .map(|text| {
                    self.model
                        .vocab()
                        .tokenize(text.as_bytes(), false, false)
                        .into_iter()
                        .map(|token| token.0 as u32)
                        .collect()
                })
                .collect();
            (rule.ngram, said)
        }))
    }

    /// Hands the request to this model's engine thread.
    pub(super) fn generate(&self, request: GenerationRequest) -> Result<ChunkStream, BackendError> {
        let prompt = self.prompt(&request)?;
        let matcher = request
            .json_schema
            .as_ref()
            .map(|schema| self.matcher(schema))
            .transpose()?;
        let (output, chunks) = relay(RELAY_CAPACITY, self.engine.waker());
        let job = Job {
            prompt,
            max_tokens: request.sampling.max_tokens,
            sampler: self.sampler(&request),
            matcher,
            text: TextAssembler::new(request.stop),
            model: self.name.clone(),
            output,
        };
        match self.engine.submit(job) {
            Ok(()) => Ok(Box::pin(chunks)),
            Err(Refused::Full) => Err(BackendError::Overloaded {
                backend: NAME,
                reason: format!(
                    "all {} sequences are busy and {} requests already wait (model {})",
                    self.shape.parallel, self.queue, self.name
                ),
            }),
            Err(Refused::Stopped) => Err(BackendError::Unavailable {
                backend: NAME,
                endpoint: self.path.display().to_string(),
                reason: format!("the engine thread of model {} stopped", self.name),
            }),
        }
    }
}

/// A clear error for a path that is missing or not a GGUF file, before
/// llama.cpp sees it.
fn check_gguf(path: &Path) -> Result<(), String> {
    let mut file = std::fs::File::open(path).map_err(|error| format!("cannot open it: {error}"))?;
    let mut magic = [0u8; 4];
    file.read_exact(&mut magic)
        .map_err(|error| format!("cannot read it: {error}"))?;
    if &magic != GGUF_MAGIC {
        return Err("it is not a GGUF file (wrong magic bytes)".to_owned());
    }
    Ok(())
}

/// A seed for requests that set none: distinct per request.
fn fresh_seed() -> u64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_nanos() as u64);
    nanos ^ COUNTER.fetch_add(1, Ordering::Relaxed).rotate_left(32)
}
