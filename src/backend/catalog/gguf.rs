//! Reads a model's facts from a GGUF file's header: the metadata key-value
//! pairs and the tensor infos, never the tensor data.
//!
//! The layout is GGUF v2/v3, little endian (llama.cpp's `gguf.h`, PyPI
//! `gguf`'s `GGUFReader`). Every length read from the file is checked against
//! the bytes left in it before anything is allocated or skipped, so a
//! truncated or corrupt file is an error, never a huge allocation or a panic.
//! Big arrays (the tokenizer's vocabulary: 49152 strings for SmolLM2) are
//! skipped by seeking past them.

use std::{
    collections::HashMap,
    fs::File,
    io::{BufReader, Read},
    path::Path,
};

use super::{CatalogError, ModelFacts};

const MAGIC: &[u8; 4] = b"GGUF";
/// Versions whose lengths are u64 (v1 used u32 and is long gone).
const SUPPORTED_VERSIONS: [u32; 2] = [2, 3];
/// ggml's `GGML_MAX_DIMS`.
const MAX_DIMS: u32 = 4;
/// Keys and kept string values are short; anything longer is corrupt.
const MAX_KEY_LEN: u64 = 64 * 1024;
/// Integer arrays up to this length are kept (per-layer head counts); longer
/// ones are skipped.
const MAX_KEPT_ARRAY: u64 = 4096;
/// Smallest possible key-value pair: key length, value type, one byte.
const MIN_KV_BYTES: u64 = 8 + 4 + 1;
/// Smallest possible tensor info: name length, n_dims, type, offset.
const MIN_TENSOR_INFO_BYTES: u64 = 8 + 4 + 4 + 8;

/// ggml tensor type names by id, as PyPI gguf 0.19.0's `GGMLQuantizationType`.
const GGML_TYPES: &[(u32, &str)] = &[
    (0, "F32"),
    (1, "F16"),
    (2, "Q4_0"),
    (3, "Q4_1"),
    (6, "Q5_0"),
    (7, "Q5_1"),
    (8, "Q8_0"),
    (9, "Q8_1"),
    (10, "Q2_K"),
    (11, "Q3_K"),
    (12, "Q4_K"),
    (13, "Q5_K"),
    (14, "Q6_K"),
    (15, "Q8_K"),
    (16, "IQ2_XXS"),
    (17, "IQ2_XS"),
    (18, "IQ3_XXS"),
    (19, "IQ1_S"),
    (20, "IQ4_NL"),
    (21, "IQ3_S"),
    (22, "IQ2_S"),
    (23, "IQ4_XS"),
    (24, "I8"),
    (25, "I16"),
    (26, "I32"),
    (27, "I64"),
    (28, "F64"),
    (29, "IQ1_M"),
    (30, "BF16"),
    (34, "TQ1_0"),
    (35, "TQ2_0"),
    (39, "MXFP4"),
    (40, "NVFP4"),
    (41, "Q1_0"),
];

/// `general.file_type` names by id, as PyPI gguf 0.19.0's `LlamaFileType`
/// (without its `MOSTLY_` prefix); used only when a file has no tensors.
const FILE_TYPES: &[(u32, &str)] = &[
    (0, "F32"),
    (1, "F16"),
    (2, "Q4_0"),
    (3, "Q4_1"),
    (7, "Q8_0"),
    (8, "Q5_0"),
    (9, "Q5_1"),
    (10, "Q2_K"),
    (11, "Q3_K_S"),
    (12, "Q3_K_M"),
    (13, "Q3_K_L"),
    (14, "Q4_K_S"),
    (15, "Q4_K_M"),
    (16, "Q5_K_S"),
    (17, "Q5_K_M"),
    (18, "Q6_K"),
    (19, "IQ2_XXS"),
    (20, "IQ2_XS"),
    (21, "Q2_K_S"),
    (22, "IQ3_XS"),
    (23, "IQ3_XXS"),
    (24, "IQ1_S"),
    (25, "IQ4_NL"),
    (26, "IQ3_S"),
    (27, "IQ3_M"),
    (28, "IQ2_S"),
    (29, "IQ2_M"),
    (30, "IQ4_XS"),
    (31, "IQ1_M"),
    (32, "BF16"),
    (36, "TQ1_0"),
    (37, "TQ2_0"),
    (38, "MXFP4_MOE"),
    (39, "NVFP4"),
    (40, "Q1_0"),
];

/// The name of ggml tensor type `id`, or `type N` for one we do not know.
pub fn ggml_type_name(id: u32) -> String {
    lookup(GGML_TYPES, id).unwrap_or_else(|| format!("type {id}"))
}

fn lookup(table: &[(u32, &str)], id: u32) -> Option<String> {
    table
        .iter()
        .find(|(known, _)| *known == id)
        .map(|(_, name)| (*name).to_owned())
}

/// GGUF metadata value types.
mod value_type {
    pub const U8: u32 = 0;
    pub const I8: u32 = 1;
    pub const U16: u32 = 2;
    pub const I16: u32 = 3;
    pub const U32: u32 = 4;
    pub const I32: u32 = 5;
    pub const F32: u32 = 6;
    pub const BOOL: u32 = 7;
    pub const STRING: u32 = 8;
    pub const ARRAY: u32 = 9;
    pub const U64: u32 = 10;
    pub const I64: u32 = 11;
    pub const F64: u32 = 12;
}

/// The metadata values the catalog keeps; the rest are skipped.
#[derive(Debug, Clone, PartialEq)]
enum Value {
    Int(i128),
    Text(String),
    Ints(Vec<i128>),
    Other,
}

/// Reads the facts of the GGUF file at `path`.
pub fn read(path: &Path) -> Result<ModelFacts, CatalogError> {
    let invalid = |reason: String| CatalogError::invalid(path, reason);
    let file = File::open(path).map_err(|source| CatalogError::io(path, source))?;
    let len = file
        .metadata()
        .map_err(|source| CatalogError::io(path, source))?
        .len();
    let mut reader = Reader {
        inner: BufReader::new(file),
        pos: 0,
        len,
    };
    let header = Header::read(&mut reader).map_err(invalid)?;
    header.facts().map_err(invalid)
}

/// What the catalog needs of a GGUF header.
struct Header {
    metadata: HashMap<String, Value>,
    /// Element count per ggml type id.
    elements_by_type: HashMap<u32, u64>,
}

impl Header {
    fn read(reader: &mut Reader) -> Result<Self, String> {
        let mut magic = [0u8; 4];
        reader
            .read_exact(&mut magic)
            .map_err(|_| "not a GGUF file (shorter than its magic bytes)".to_owned())?;
        if &magic != MAGIC {
            return Err(format!("not a GGUF file (magic {magic:02x?})"));
        }
        let version = reader.u32()?;
        if !SUPPORTED_VERSIONS.contains(&version) {
            return Err(format!("unsupported GGUF version {version}"));
        }
        let tensor_count = reader.u64()?;
        let kv_count = reader.u64()?;
        reader.ensure_room(kv_count, MIN_KV_BYTES, "metadata entries")?;
        reader.ensure_room(tensor_count, MIN_TENSOR_INFO_BYTES, "tensor infos")?;

        let mut metadata = HashMap::new();
        for _ in 0..kv_count {
            let key = reader.string(MAX_KEY_LEN)?;
            let value_type = reader.u32()?;
            let value = reader.value(value_type)?;
            metadata.insert(key, value);
        }

        let mut elements_by_type = HashMap::new();
        for _ in 0..tensor_count {
            let name_len = reader.u64()?;
            reader.skip(name_len)?;
            let n_dims = reader.u32()?;
            if n_dims > MAX_DIMS {
                return Err(format!("tensor with {n_dims} dimensions"));
            }
            let mut elements: u64 = 1;
            for _ in 0..n_dims {
                elements = elements
                    .checked_mul(reader.u64()?)
                    .ok_or("tensor shape overflows")?;
            }
            let ggml_type = reader.u32()?;
            let _offset = reader.u64()?;
            let total = elements_by_type.entry(ggml_type).or_insert(0u64);
            *total = total.checked_add(elements).ok_or("tensor sizes overflow")?;
        }
        Ok(Self {
            metadata,
            elements_by_type,
        })
    }

    fn facts(&self) -> Result<ModelFacts, String> {
        let architecture = match self.metadata.get("general.architecture") {
            Some(Value::Text(architecture)) => architecture.clone(),
            _ => return Err("no general.architecture".into()),
        };
        let key = |suffix: &str| format!("{architecture}.{suffix}");
        let context_length = self.required_u32(&key("context_length"))?;
        let layers = self.required_u32(&key("block_count"))?;
        let heads = self.largest(&key("attention.head_count"));
        let kv_heads = self.largest(&key("attention.head_count_kv")).or(heads);
        let head_dim = self.largest(&key("attention.key_length")).or_else(|| {
            let embedding = self.largest(&key("embedding_length"))?;
            embedding.checked_div(heads?)
        });
        // Architectures without attention (e.g. Mamba) keep no KV cache.
        let kv_width = kv_heads.zip(head_dim).map_or(0, |(kv, dim)| kv * dim);
        let kv_width = u32::try_from(kv_width).map_err(|_| "KV width overflows")?;

        let parameters = self.elements_by_type.values().sum();
        let dominant = self
            .elements_by_type
            .iter()
            .max_by_key(|(id, elements)| (**elements, std::cmp::Reverse(**id)))
            .map(|(id, _)| ggml_type_name(*id));
        let quantization = match dominant {
            Some(name) => name,
            None => match self.metadata.get("general.file_type") {
                Some(Value::Int(id)) => u32::try_from(*id)
                    .ok()
                    .and_then(|id| lookup(FILE_TYPES, id))
                    .unwrap_or_else(|| format!("file type {id}")),
                _ => "unknown".into(),
            },
        };
        Ok(ModelFacts {
            architecture,
            parameters,
            quantization,
            context_length,
            layers,
            kv_width,
        })
    }

    fn required_u32(&self, key: &str) -> Result<u32, String> {
        let value = self.largest(key).ok_or_else(|| format!("no {key}"))?;
        u32::try_from(value).map_err(|_| format!("{key} = {value} is out of range"))
    }

    /// An integer key's value; for a per-layer array, its largest element
    /// (the layer that needs the most KV room sizes the cache).
    fn largest(&self, key: &str) -> Option<u64> {
        let value = match self.metadata.get(key)? {
            Value::Int(value) => *value,
            Value::Ints(values) => *values.iter().max()?,
            Value::Text(_) | Value::Other => return None,
        };
        u64::try_from(value).ok()
    }
}

/// A GGUF file being read, with its position tracked so every length can be
/// checked against the bytes left.
struct Reader {
    inner: BufReader<File>,
    pos: u64,
    len: u64,
}

impl Reader {
    fn remaining(&self) -> u64 {
        self.len - self.pos
    }

    /// Fails unless `count` items of at least `each` bytes fit in the rest.
    fn ensure_room(&self, count: u64, each: u64, what: &str) -> Result<(), String> {
        match count.checked_mul(each) {
            Some(bytes) if bytes <= self.remaining() => Ok(()),
            _ => Err(format!(
                "{count} {what} cannot fit in the {} bytes left",
                self.remaining()
            )),
        }
    }

    fn read_exact(&mut self, buf: &mut [u8]) -> Result<(), String> {
        self.ensure_room(buf.len() as u64, 1, "bytes")
            .map_err(|_| format!("truncated at byte {}", self.pos))?;
        self.inner
            .read_exact(buf)
            .map_err(|error| format!("read at byte {}: {error}", self.pos))?;
        self.pos += buf.len() as u64;
        Ok(())
    }

    fn skip(&mut self, bytes: u64) -> Result<(), String> {
        self.ensure_room(bytes, 1, "bytes")
            .map_err(|_| format!("truncated at byte {}", self.pos))?;
        let offset = i64::try_from(bytes).map_err(|_| "length overflows")?;
        self.inner
            .seek_relative(offset)
            .map_err(|error| format!("seek at byte {}: {error}", self.pos))?;
        self.pos += bytes;
        Ok(())
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], String> {
        let mut buf = [0u8; N];
        self.read_exact(&mut buf)?;
        Ok(buf)
    }

    fn u32(&mut self) -> Result<u32, String> {
        self.array().map(u32::from_le_bytes)
    }

    fn u64(&mut self) -> Result<u64, String> {
        self.array().map(u64::from_le_bytes)
    }

    /// A string of at most `max` bytes; a longer one is corrupt.
    fn string(&mut self, max: u64) -> Result<String, String> {
        let len = self.u64()?;
        if len > max {
            return Err(format!("string of {len} bytes at byte {}", self.pos));
        }
        self.string_body(len)
    }

    fn string_body(&mut self, len: u64) -> Result<String, String> {
        self.ensure_room(len, 1, "bytes")
            .map_err(|_| format!("truncated at byte {}", self.pos))?;
        let mut bytes = vec![0u8; len as usize];
        self.read_exact(&mut bytes)?;
        String::from_utf8(bytes).map_err(|_| format!("invalid UTF-8 before byte {}", self.pos))
    }

    fn value(&mut self, value_type: u32) -> Result<Value, String> {
        use value_type::*;
        let int = match value_type {
            U8 => i128::from(self.array::<1>()?[0]),
            I8 => i128::from(i8::from_le_bytes(self.array()?)),
            U16 => i128::from(u16::from_le_bytes(self.array()?)),
            I16 => i128::from(i16::from_le_bytes(self.array()?)),
            U32 => i128::from(self.u32()?),
            I32 => i128::from(i32::from_le_bytes(self.array()?)),
            U64 => i128::from(self.u64()?),
            I64 => i128::from(i64::from_le_bytes(self.array()?)),
            F32 | BOOL | F64 => {
                self.skip(scalar_size(value_type).unwrap_or(0))?;
                return Ok(Value::Other);
            }
            STRING => {
                // Long strings (chat templates, licences) are not facts.
                let len = self.u64()?;
                if len > MAX_KEY_LEN {
                    self.skip(len)?;
                    return Ok(Value::Other);
                }
                return self.string_body(len).map(Value::Text);
            }
            ARRAY => return self.array_value(),
            other => return Err(format!("unknown value type {other} at byte {}", self.pos)),
        };
        Ok(Value::Int(int))
    }

    fn array_value(&mut self) -> Result<Value, String> {
        let element_type = self.u32()?;
        let count = self.u64()?;
        let is_int = matches!(
            element_type,
            value_type::U8
                | value_type::I8
                | value_type::U16
                | value_type::I16
                | value_type::U32
                | value_type::I32
                | value_type::U64
                | value_type::I64
        );
        if let Some(size) = scalar_size(element_type) {
            self.ensure_room(count, size, "array elements")?;
            if !is_int || count > MAX_KEPT_ARRAY {
                self.skip(count * size)?;
                return Ok(Value::Other);
            }
            let mut values = Vec::with_capacity(count as usize);
            for _ in 0..count {
                match self.value(element_type)? {
                    Value::Int(value) => values.push(value),
                    other => return Err(format!("integer array element read as {other:?}")),
                }
            }
            return Ok(Value::Ints(values));
        }
        // Strings and nested arrays: at least 8 bytes each (a length).
        self.ensure_room(count, 8, "array elements")?;
        for _ in 0..count {
            match element_type {
                value_type::STRING => {
                    let len = self.u64()?;
                    self.skip(len)?;
                }
                value_type::ARRAY => {
                    self.array_value()?;
                }
                other => return Err(format!("unknown array element type {other}")),
            }
        }
        Ok(Value::Other)
    }
}

/// Bytes of a fixed-size value type; `None` for strings and arrays.
fn scalar_size(value_type: u32) -> Option<u64> {
    use value_type::*;
    match value_type {
        U8 | I8 | BOOL => Some(1),
        U16 | I16 => Some(2),
        U32 | I32 | F32 => Some(4),
        U64 | I64 | F64 => Some(8),
        _ => None,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::backend::catalog::tests::TempDir;

    /// A metadata value for [`write_gguf`].
    pub enum Meta {
        U32(u32),
        Str(&'static str),
        Strings(usize),
        Ints(Vec<u32>),
        F32(f32),
    }

    /// Writes a header-only GGUF v3 file: `meta` key-values and `tensors`
    /// (name, shape, ggml type); the tensor data is left out, which the
    /// reader never looks at.
    pub fn write_gguf(path: &Path, meta: &[(&str, Meta)], tensors: &[(&str, &[u64], u32)]) {
        let mut out = Vec::new();
        let string = |out: &mut Vec<u8>, text: &str| {
            out.extend((text.len() as u64).to_le_bytes());
            out.extend(text.as_bytes());
        };
        out.extend(MAGIC);
        out.extend(3u32.to_le_bytes());
        out.extend((tensors.len() as u64).to_le_bytes());
        out.extend((meta.len() as u64).to_le_bytes());
        for (key, value) in meta {
            string(&mut out, key);
            match value {
                Meta::U32(value) => {
                    out.extend(value_type::U32.to_le_bytes());
                    out.extend(value.to_le_bytes());
                }
                Meta::F32(value) => {
                    out.extend(value_type::F32.to_le_bytes());
                    out.extend(value.to_le_bytes());
                }
                Meta::Str(text) => {
                    out.extend(value_type::STRING.to_le_bytes());
                    string(&mut out, text);
                }
                Meta::Strings(count) => {
                    out.extend(value_type::ARRAY.to_le_bytes());
                    out.extend(value_type::STRING.to_le_bytes());
                    out.extend((*count as u64).to_le_bytes());
                    for index in 0..*count {
                        string(&mut out, &format!("token{index}"));
                    }
                }
                Meta::Ints(values) => {
                    out.extend(value_type::ARRAY.to_le_bytes());
                    out.extend(value_type::U32.to_le_bytes());
                    out.extend((values.len() as u64).to_le_bytes());
                    for value in values {
                        out.extend(value.to_le_bytes());
                    }
                }
            }
        }
        for (name, shape, ggml_type) in tensors {
            string(&mut out, name);
            out.extend((shape.len() as u32).to_le_bytes());
            for dim in *shape {
                out.extend(dim.to_le_bytes());
            }
            out.extend(ggml_type.to_le_bytes());
            out.extend(0u64.to_le_bytes());
        }
        std::fs::write(path, out).expect("write GGUF");
    }

    /// A tiny llama-shaped GGUF: 2 layers, 8 heads of which 2 for KV,
    /// embedding 64, a vocabulary of 1000 strings.
    pub fn write_tiny_llama(path: &Path) {
        write_gguf(
            path,
            &[
                ("general.architecture", Meta::Str("llama")),
                ("general.file_type", Meta::U32(3)),
                ("tokenizer.ggml.tokens", Meta::Strings(1000)),
                ("llama.rope.freq_base", Meta::F32(10000.0)),
                ("llama.context_length", Meta::U32(2048)),
                ("llama.block_count", Meta::U32(2)),
                ("llama.embedding_length", Meta::U32(64)),
                ("llama.attention.head_count", Meta::U32(8)),
                ("llama.attention.head_count_kv", Meta::U32(2)),
            ],
            &[
                ("token_embd.weight", &[64, 100], 8),
                ("blk.0.attn_q.weight", &[64, 64], 3),
                ("blk.1.attn_q.weight", &[64, 64], 3),
                ("blk.0.ffn_up.weight", &[64, 256], 3),
                ("blk.1.ffn_up.weight", &[64, 256], 3),
                ("output_norm.weight", &[64], 0),
            ],
        );
    }

    #[test]
    fn reads_facts_from_the_header() {
        let dir = TempDir::new("gguf-facts");
        let path = dir.path().join("tiny.gguf");
        write_tiny_llama(&path);
        let facts = read(&path).expect("read tiny GGUF");
        assert_eq!(
            facts,
            ModelFacts {
                architecture: "llama".into(),
                parameters: 64 * 100 + 2 * 64 * 64 + 2 * 64 * 256 + 64,
                // The Q4_1 blocks hold the most elements.
                quantization: "Q4_1".into(),
                context_length: 2048,
                layers: 2,
                kv_width: 2 * (64 / 8),
            }
        );
    }

    #[test]
    fn key_length_and_per_layer_head_counts_size_the_kv_width() {
        let dir = TempDir::new("gguf-kv");
        let path = dir.path().join("per-layer.gguf");
        write_gguf(
            &path,
            &[
                ("general.architecture", Meta::Str("openelm")),
                ("openelm.context_length", Meta::U32(2048)),
                ("openelm.block_count", Meta::U32(3)),
                ("openelm.embedding_length", Meta::U32(1280)),
                ("openelm.attention.head_count", Meta::Ints(vec![12, 16, 20])),
                ("openelm.attention.head_count_kv", Meta::Ints(vec![3, 4, 5])),
                ("openelm.attention.key_length", Meta::U32(64)),
            ],
            &[("blk.0.attn_qkv.weight", &[1280, 1280], 1)],
        );
        let facts = read(&path).expect("read per-layer GGUF");
        assert_eq!(facts.kv_width, 5 * 64);
        assert_eq!(facts.quantization, "F16");
    }

    #[test]
    fn without_tensors_the_file_type_names_the_quantization() {
        let dir = TempDir::new("gguf-filetype");
        let path = dir.path().join("vocab-only.gguf");
        write_gguf(
            &path,
            &[
                ("general.architecture", Meta::Str("llama")),
                ("general.file_type", Meta::U32(15)),
                ("llama.context_length", Meta::U32(4096)),
                ("llama.block_count", Meta::U32(2)),
            ],
            &[],
        );
        let facts = read(&path).expect("read vocab-only GGUF");
        assert_eq!(facts.quantization, "Q4_K_M");
        assert_eq!((facts.parameters, facts.kv_width), (0, 0));
    }

    #[test]
    fn unknown_ggml_types_are_named_by_id() {
        assert_eq!(ggml_type_name(3), "Q4_1");
        assert_eq!(ggml_type_name(30), "BF16");
        assert_eq!(ggml_type_name(4), "type 4");
    }

    fn read_error(bytes: &[u8]) -> String {
        let dir = TempDir::new("gguf-corrupt");
        let path = dir.path().join("corrupt.gguf");
        std::fs::write(&path, bytes).expect("write corrupt file");
        match read(&path) {
            Err(CatalogError::Invalid { reason, .. }) => reason,
            other => panic!("expected an invalid-file error, got {other:?}"),
        }
    }

    #[test]
    fn corrupt_files_are_errors_not_panics() {
        assert!(read_error(b"GGML\x03\0\0\0").contains("not a GGUF file"));
        assert!(read_error(b"GGUF\x01\0\0\0").contains("unsupported GGUF version 1"));
        assert!(read_error(b"GGU").contains("shorter than its magic bytes"));

        let mut huge_counts = b"GGUF\x03\0\0\0".to_vec();
        huge_counts.extend(u64::MAX.to_le_bytes());
        huge_counts.extend(u64::MAX.to_le_bytes());
        assert!(read_error(&huge_counts).contains("cannot fit"));

        let mut huge_key = b"GGUF\x03\0\0\0".to_vec();
        huge_key.extend(0u64.to_le_bytes());
        huge_key.extend(1u64.to_le_bytes());
        huge_key.extend((u64::MAX / 2).to_le_bytes());
        huge_key.extend([0u8; 16]);
        assert!(read_error(&huge_key).contains("string of"));

        let mut huge_array = b"GGUF\x03\0\0\0".to_vec();
        huge_array.extend(0u64.to_le_bytes());
        huge_array.extend(1u64.to_le_bytes());
        huge_array.extend(1u64.to_le_bytes());
        huge_array.extend(b"k");
        huge_array.extend(value_type::ARRAY.to_le_bytes());
        huge_array.extend(value_type::STRING.to_le_bytes());
        huge_array.extend((u64::MAX / 4).to_le_bytes());
        assert!(read_error(&huge_array).contains("cannot fit"));
    }

    #[test]
    fn a_truncated_real_header_is_an_error() {
        let dir = TempDir::new("gguf-truncated");
        let path = dir.path().join("tiny.gguf");
        write_tiny_llama(&path);
        let bytes = std::fs::read(&path).expect("read tiny GGUF");
        for cut in [10, 40, bytes.len() / 2, bytes.len() - 1] {
            let reason = read_error(&bytes[..cut]);
            assert!(
                reason.contains("truncated") || reason.contains("cannot fit"),
                "cut at {cut}: {reason}"
            );
        }
    }
}
