//! Reads a model's facts from an MLX (Hugging Face layout) model directory:
//! `config.json` for the shape, the `*.safetensors` headers for the parameter
//! count and dtype, never the weights themselves.
//!
//! A safetensors file starts with a u64 little-endian header length and a
//! JSON object `{name: {dtype, shape, data_offsets}, "__metadata__": {...}}`.
//! MLX stores a quantized matrix as packed `U32` words next to its `scales`
//! and `biases`; those count as the matrix's unpacked elements, so a 4-bit
//! model reports the parameters of the model, not of its packing.

use std::{
    collections::HashMap,
    fs::{self, File},
    io::Read,
    path::{Path, PathBuf},
};

use serde_json::Value;

use super::{CatalogError, ModelFacts};

pub const CONFIG: &str = "config.json";
const WEIGHTS_EXTENSION: &str = "safetensors";
/// Either holds a usable tokenizer (`tokenizer_config.json` alone does not).
const TOKENIZERS: [&str; 2] = ["tokenizer.json", "tokenizer.model"];
/// Headers of real models are a few hundred KiB; more is a corrupt file.
const MAX_HEADER_BYTES: u64 = 100 * 1024 * 1024;
/// Bits in the `U32` word MLX packs quantized weights into.
const PACKED_WORD_BITS: u64 = 32;

/// Whether `dir` claims to be a model directory (holds `config.json`); one
/// without (a sentence-embedding directory of tokenizer + weights) is not.
pub fn is_model_dir(dir: &Path) -> bool {
    dir.join(CONFIG).is_file()
}

/// The facts of the MLX model directory `dir`, and its size on disk (weight,
/// config and tokenizer files).
pub fn read(dir: &Path) -> Result<(ModelFacts, u64), CatalogError> {
    let files = ModelFiles::list(dir)?;
    if files.weights.is_empty() {
        return Err(CatalogError::invalid(dir, "no *.safetensors weights"));
    }
    if !TOKENIZERS.iter().any(|name| dir.join(name).is_file()) {
        return Err(CatalogError::invalid(
            dir,
            format!("no tokenizer ({})", TOKENIZERS.join(" or ")),
        ));
    }
    let config_path = dir.join(CONFIG);
    let text = fs::read_to_string(&config_path)
        .map_err(|source| CatalogError::io(&config_path, source))?;
    let config: Value = serde_json::from_str(&text)
        .map_err(|error| CatalogError::invalid(&config_path, error.to_string()))?;
    let config = Config::new(&config);
    let shape = config
        .shape()
        .map_err(|reason| CatalogError::invalid(&config_path, reason))?;

    let mut tensors = Tensors::default();
    for path in &files.weights {
        tensors
            .add_file(path)
            .map_err(|reason| CatalogError::invalid(path, reason))?;
    }
    let bits = config.quantization_bits();
    let quantization = match bits {
        Some(bits) => format!("{bits}-bit"),
        None => tensors.dominant_dtype().unwrap_or_else(|| "unknown".into()),
    };
    let facts = ModelFacts {
        architecture: shape.architecture,
        parameters: tensors.parameters(bits),
        quantization,
        context_length: shape.context_length,
        layers: shape.layers,
        kv_width: shape.kv_width,
    };
    Ok((facts, files.size_bytes))
}

/// The files of a model directory that make up the model.
struct ModelFiles {
    weights: Vec<PathBuf>,
    size_bytes: u64,
}

impl ModelFiles {
    fn list(dir: &Path) -> Result<Self, CatalogError> {
        let mut weights = Vec::new();
        let mut size_bytes = 0;
        let entries = fs::read_dir(dir).map_err(|source| CatalogError::io(dir, source))?;
        for entry in entries {
            let path = entry
                .map_err(|source| CatalogError::io(dir, source))?
                .path();
            let name = path
                .file_name()
                .and_then(|name| name.to_str())
                .unwrap_or("");
            let is_weights = path.extension().is_some_and(|ext| ext == WEIGHTS_EXTENSION);
            // Configs (model, tokenizer, generation) are JSON; the rest of a
            // tokenizer is tokenizer.model, merges.txt, vocab.txt or a
            // chat_template.jinja.
            let is_part = is_weights
                || path
                    .extension()
                    .is_some_and(|ext| ext == "json" || ext == "jinja")
                || name.starts_with("tokenizer")
                || name == "merges.txt"
                || name == "vocab.txt";
            if !is_part {
                continue;
            }
            // Follows symlinks: a Hugging Face snapshot links into its blobs.
            let metadata = fs::metadata(&path).map_err(|source| CatalogError::io(&path, source))?;
            if !metadata.is_file() {
                continue;
            }
            size_bytes += metadata.len();
            if is_weights {
                weights.push(path);
            }
        }
        weights.sort();
        Ok(Self {
            weights,
            size_bytes,
        })
    }
}

/// The shape facts of a `config.json`.
struct Shape {
    architecture: String,
    context_length: u32,
    layers: u32,
    kv_width: u32,
}

struct Config<'a> {
    root: &'a Value,
}

impl<'a> Config<'a> {
    fn new(root: &'a Value) -> Self {
        Self { root }
    }

    /// A key of the config, or of its `text_config` (multimodal models keep
    /// the language model's shape there).
    fn get(&self, key: &str) -> Option<&'a Value> {
        self.root
            .get(key)
            .or_else(|| self.root.get("text_config")?.get(key))
            .filter(|value| !value.is_null())
    }

    fn number(&self, key: &str) -> Result<Option<u32>, String> {
        let Some(value) = self.get(key) else {
            return Ok(None);
        };
        value
            .as_u64()
            .and_then(|value| u32::try_from(value).ok())
            .map(Some)
            .ok_or_else(|| format!("{key} is {value}, not a count"))
    }

    fn required(&self, key: &str) -> Result<u32, String> {
        self.number(key)?.ok_or_else(|| format!("no {key}"))
    }

    fn shape(&self) -> Result<Shape, String> {
        let architecture = self
            .get("model_type")
            .and_then(Value::as_str)
            .ok_or("no model_type")?
            .to_owned();
        let heads = self.required("num_attention_heads")?;
        if heads == 0 {
            return Err("num_attention_heads is 0".into());
        }
        let kv_heads = self.number("num_key_value_heads")?.unwrap_or(heads);
        let head_dim = match self.number("head_dim")? {
            Some(head_dim) => head_dim,
            None => self.required("hidden_size")? / heads,
        };
        Ok(Shape {
            architecture,
            context_length: self.required("max_position_embeddings")?,
            layers: self.required("num_hidden_layers")?,
            kv_width: kv_heads.checked_mul(head_dim).ok_or("KV width overflows")?,
        })
    }

    /// Bits per weight of an MLX-quantized model (`quantization`, which
    /// mlx-lm writes; `quantization_config` is the Hugging Face spelling).
    fn quantization_bits(&self) -> Option<u64> {
        ["quantization", "quantization_config"]
            .iter()
            .find_map(|key| self.get(key)?.get("bits")?.as_u64())
    }
}

/// The tensors of a model's safetensors files, by name.
#[derive(Default)]
struct Tensors {
    by_name: HashMap<String, Tensor>,
}

struct Tensor {
    dtype: String,
    elements: u64,
}

impl Tensors {
    fn add_file(&mut self, path: &Path) -> Result<(), String> {
        let mut file = File::open(path).map_err(|error| error.to_string())?;
        let file_len = file.metadata().map_err(|error| error.to_string())?.len();
        let mut len_bytes = [0u8; 8];
        file.read_exact(&mut len_bytes)
            .map_err(|_| "truncated safetensors header length".to_owned())?;
        let header_len = u64::from_le_bytes(len_bytes);
        if header_len > MAX_HEADER_BYTES || header_len > file_len.saturating_sub(8) {
            return Err(format!(
                "safetensors header of {header_len} bytes in a file of {file_len}"
            ));
        }
        let mut header = vec![0u8; header_len as usize];
        file.read_exact(&mut header)
            .map_err(|error| format!("safetensors header: {error}"))?;
        let header: HashMap<String, Value> = serde_json::from_slice(&header)
            .map_err(|error| format!("safetensors header: {error}"))?;
        for (name, info) in header {
            if name == "__metadata__" {
                continue;
            }
            let dtype = info
                .get("dtype")
                .and_then(Value::as_str)
                .ok_or_else(|| format!("tensor {name} has no dtype"))?
                .to_owned();
            let shape = info
                .get("shape")
                .and_then(Value::as_array)
                .ok_or_else(|| format!("tensor {name} has no shape"))?;
            let mut elements: u64 = 1;
            for dim in shape {
                let dim = dim
                    .as_u64()
                    .ok_or_else(|| format!("tensor {name} has shape {shape:?}"))?;
                elements = elements
                    .checked_mul(dim)
                    .ok_or_else(|| format!("tensor {name}'s shape overflows"))?;
            }
            self.by_name.insert(name, Tensor { dtype, elements });
        }
        Ok(())
    }

    /// Whether `name` is the packed weight of a quantized matrix (it has
    /// scales beside it), or those scales and biases.
    fn role(&self, name: &str) -> Role {
        let scales_of = |suffix: &str| {
            name.strip_suffix(suffix)
                .is_some_and(|stem| self.by_name.contains_key(&format!("{stem}.weight")))
        };
        if name
            .strip_suffix(".weight")
            .is_some_and(|stem| self.by_name.contains_key(&format!("{stem}.scales")))
        {
            Role::Packed
        } else if scales_of(".scales") || scales_of(".biases") {
            Role::Quantization
        } else {
            Role::Plain
        }
    }

    fn parameters(&self, bits: Option<u64>) -> u64 {
        self.by_name
            .iter()
            .map(|(name, tensor)| match (self.role(name), bits) {
                (Role::Packed, Some(bits)) if bits > 0 => {
                    tensor.elements * (PACKED_WORD_BITS / bits)
                }
                (Role::Quantization, Some(_)) => 0,
                _ => tensor.elements,
            })
            .sum()
    }

    /// The dtype holding the most elements, lower-cased as MLX names them
    /// (`bf16`, `f16`, `f32`).
    fn dominant_dtype(&self) -> Option<String> {
        let mut by_dtype: HashMap<&str, u64> = HashMap::new();
        for tensor in self.by_name.values() {
            *by_dtype.entry(&tensor.dtype).or_default() += tensor.elements;
        }
        by_dtype
            .into_iter()
            .max_by(|a, b| a.1.cmp(&b.1).then(b.0.cmp(a.0)))
            .map(|(dtype, _)| dtype.to_lowercase())
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Role {
    Packed,
    Quantization,
    Plain,
}

#[cfg(test)]
pub(crate) mod tests {
    use serde_json::json;

    use super::*;
    use crate::backend::catalog::tests::TempDir;

    /// Writes a header-only safetensors file of `tensors` (name, dtype,
    /// shape); the data is left out, which the reader never looks at.
    pub fn write_safetensors(path: &Path, tensors: &[(&str, &str, &[u64])]) {
        let mut header = serde_json::Map::new();
        header.insert("__metadata__".into(), json!({"format": "mlx"}));
        for (name, dtype, shape) in tensors {
            header.insert(
                (*name).into(),
                json!({"dtype": dtype, "shape": shape, "data_offsets": [0, 0]}),
            );
        }
        let header = serde_json::to_vec(&header).expect("encode header");
        let mut out = (header.len() as u64).to_le_bytes().to_vec();
        out.extend(header);
        fs::write(path, out).expect("write safetensors");
    }

    /// A tiny mistral-shaped MLX directory, as tests/support/tiny_mlx_model.py
    /// builds: hidden 64, 2 layers, 4 heads of which 2 for KV; `extra_config`
    /// is merged into config.json.
    pub fn write_tiny_mlx(dir: &Path, extra_config: Value, tensors: &[(&str, &str, &[u64])]) {
        fs::create_dir_all(dir).expect("create model dir");
        let mut config = json!({
            "model_type": "mistral",
            "hidden_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 4096,
        });
        if let (Some(config), Value::Object(extra)) = (config.as_object_mut(), extra_config) {
            config.extend(extra);
        }
        fs::write(dir.join(CONFIG), config.to_string()).expect("write config");
        fs::write(dir.join("tokenizer.json"), "{}").expect("write tokenizer");
        write_safetensors(&dir.join("model.safetensors"), tensors);
    }

    const PLAIN: &[(&str, &str, &[u64])] = &[
        ("model.embed_tokens.weight", "BF16", &[259, 64]),
        ("model.layers.0.self_attn.q_proj.weight", "BF16", &[64, 64]),
        ("model.norm.weight", "F32", &[64]),
    ];

    #[test]
    fn reads_facts_from_config_and_headers() {
        let dir = TempDir::new("mlx-facts");
        let model = dir.path().join("tiny-mistral");
        write_tiny_mlx(&model, json!({}), PLAIN);
        let (facts, size) = read(&model).expect("read tiny MLX dir");
        assert_eq!(
            facts,
            ModelFacts {
                architecture: "mistral".into(),
                parameters: 259 * 64 + 64 * 64 + 64,
                quantization: "bf16".into(),
                context_length: 4096,
                layers: 2,
                kv_width: 2 * (64 / 4),
            }
        );
        let on_disk: u64 = ["config.json", "tokenizer.json", "model.safetensors"]
            .iter()
            .map(|name| fs::metadata(model.join(name)).expect("stat").len())
            .sum();
        assert_eq!(size, on_disk);
    }

    #[test]
    fn quantized_weights_count_unpacked() {
        let dir = TempDir::new("mlx-quantized");
        let model = dir.path().join("tiny-4bit");
        write_tiny_mlx(
            &model,
            json!({"quantization": {"group_size": 32, "bits": 4}, "head_dim": 32}),
            &[
                ("model.layers.0.mlp.up_proj.weight", "U32", &[128, 8]),
                ("model.layers.0.mlp.up_proj.scales", "BF16", &[128, 2]),
                ("model.layers.0.mlp.up_proj.biases", "BF16", &[128, 2]),
                ("model.norm.weight", "BF16", &[64]),
            ],
        );
        let (facts, _) = read(&model).expect("read quantized MLX dir");
        assert_eq!(facts.quantization, "4-bit");
        assert_eq!(facts.parameters, 128 * 64 + 64);
        assert_eq!(facts.kv_width, 2 * 32);
    }

    #[test]
    fn incomplete_directories_are_errors() {
        let dir = TempDir::new("mlx-incomplete");
        let model = dir.path().join("no-tokenizer");
        write_tiny_mlx(&model, json!({}), PLAIN);
        fs::remove_file(model.join("tokenizer.json")).expect("remove tokenizer");
        let error = read(&model).expect_err("no tokenizer").to_string();
        assert!(error.contains("no tokenizer"), "{error}");

        let model = dir.path().join("no-layers");
        write_tiny_mlx(&model, json!({"num_hidden_layers": null}), PLAIN);
        let error = read(&model).expect_err("no layers").to_string();
        assert!(error.contains("no num_hidden_layers"), "{error}");

        let model = dir.path().join("corrupt-header");
        write_tiny_mlx(&model, json!({}), PLAIN);
        fs::write(model.join("model.safetensors"), u64::MAX.to_le_bytes()).expect("corrupt");
        let error = read(&model).expect_err("corrupt header").to_string();
        assert!(error.contains("safetensors header of"), "{error}");
    }
}
