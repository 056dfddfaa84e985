//! What a text is about, by meaning: a static sentence-embedding model
//! (WordLlama's `l2_supercat`, which `make` unpacks from its PyPI wheel)
//! read in-process. A text's vector is the mean of its tokens' vectors, so
//! embedding one costs a table look-up per token: microseconds, no
//! accelerator, no second runtime. The task rules use it to tell a part of
//! an answer that is about its task from one that drifted off.

mod tokenizer;

use std::{collections::HashMap, path::Path};

use serde::Deserialize;

use tokenizer::Tokenizer;

/// The files of a model directory (the layout model2vec uses, too).
const TOKENIZER_FILE: &str = "tokenizer.json";
const WEIGHTS_FILE: &str = "model.safetensors";

#[derive(Debug, thiserror::Error)]
pub enum MeaningError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Format(String),
}

/// A static embedding model: a tokenizer and one vector per token.
pub struct Meaning {
    tokenizer: Tokenizer,
    /// Row-major `tokens × dimensions`, as stored (half precision).
    vectors: Vec<u16>,
    dimensions: usize,
}

/// A text's direction in the model's space, of unit length (zero for a
/// text without tokens).
#[derive(Clone, Debug)]
pub struct Embedding(Vec<f32>);

impl Embedding {
    /// Cosine similarity: 1 same meaning, about 0 unrelated.
    pub fn similarity(&self, other: &Embedding) -> f32 {
        self.0.iter().zip(&other.0).map(|(a, b)| a * b).sum()
    }
}

impl Meaning {
    /// Reads `dir/tokenizer.json` and the token vectors of
    /// `dir/model.safetensors` (its one 2-D half-precision tensor).
    pub fn load(dir: &Path) -> Result<Self, MeaningError> {
        let read = |name: &str| {
            let path = dir.join(name);
            std::fs::read(&path).map_err(|source| MeaningError::Read {
                path: path.display().to_string(),
                source,
            })
        };
        let tokenizer_json = String::from_utf8(read(TOKENIZER_FILE)?)
            .map_err(|_| MeaningError::Format(format!("{TOKENIZER_FILE} is not UTF-8")))?;
        let tokenizer = Tokenizer::from_json(&tokenizer_json)?;
        let (vectors, tokens, dimensions) = half_matrix(&read(WEIGHTS_FILE)?)?;
        if tokens == 0 || dimensions == 0 {
            return Err(MeaningError::Format(format!(
                "{WEIGHTS_FILE} holds an empty {tokens}×{dimensions} matrix"
            )));
        }
        Ok(Self {
            tokenizer,
            vectors,
            dimensions,
        })
    }

    /// The model's token ids of `text`.
    pub fn token_ids(&self, text: &str) -> Vec<u32> {
        self.tokenizer.encode(text)
    }

    /// The mean of `text`'s token vectors, normalised.
    pub fn embed(&self, text: &str) -> Embedding {
        let tokens = self.vectors.len() / self.dimensions;
        let mut sum = vec![0f32; self.dimensions];
        for id in self.tokenizer.encode(text) {
            // Ids beyond the table are clamped, as the reference does.
            let row = (id as usize).min(tokens - 1) * self.dimensions;
            for (total, &half) in sum
                .iter_mut()
                .zip(&self.vectors[row..row + self.dimensions])
            {
                *total += f16_to_f32(half);
            }
        }
        let norm = sum.iter().map(|x| x * x).sum::<f32>().sqrt();
        if norm > 0.0 {
            sum.iter_mut().for_each(|x| *x /= norm);
        }
        Embedding(sum)
    }
}

#[derive(Deserialize)]
struct TensorInfo {
    dtype: String,
    shape: Vec<usize>,
    data_offsets: (usize, usize),
}

/// The one 2-D F16 tensor of a safetensors file, with its shape.
fn half_matrix(file: &[u8]) -> Result<(Vec<u16>, usize, usize), MeaningError> {
    let bad = |what: &str| MeaningError::Format(format!("{WEIGHTS_FILE}: {what}"));
    let header_len = file
        .get(..8)
        .map(|bytes| u64::from_le_bytes(bytes.try_into().expect("eight bytes")) as usize)
        .ok_or_else(|| bad("shorter than its header length"))?;
    let data_start = 8usize
        .checked_add(header_len)
        .filter(|&end| end <= file.len())
        .ok_or_else(|| bad("header runs past the end of the file"))?;
    let header: HashMap<String, serde_json::Value> =
        serde_json::from_slice(&file[8..data_start])
            .map_err(|error| bad(&format!("header is not JSON: {error}")))?;
    let mut matrices = header
        .into_iter()
        .filter(|(name, _)| name != "__metadata__")
        .filter_map(|(_, value)| serde_json::from_value::<TensorInfo>(value).ok())
        .filter(|info| info.shape.len() == 2);
    let (Some(info), None) = (matrices.next(), matrices.next()) else {
        return Err(bad("does not hold exactly one 2-D tensor"));
    };
    if info.dtype != "F16" {
        return Err(bad(&format!("its tensor is {}, not F16", info.dtype)));
    }
    let (tokens, dimensions) = (info.shape[0], info.shape[1]);
    let (start, end) = info.data_offsets;
    let data = file
        .get(data_start + start..data_start + end)
        .filter(|data| {
            Some(data.len())
                == tokens
                    .checked_mul(dimensions)
                    .and_then(|n| n.checked_mul(2))
        })
        .ok_or_else(|| bad("tensor data does not match its shape"))?;
    let vectors = data
        .chunks_exact(2)
        .map(|pair| u16::from_le_bytes([pair[0], pair[1]]))
        .collect();
    Ok((vectors, tokens, dimensions))
}

/// IEEE 754 half precision to single.
fn f16_to_f32(half: u16) -> f32 {
    let sign = u32::from(half >> 15) << 31;
    let exponent = u32::from((half >> 10) & 0x1f);
    let mantissa = u32::from(half & 0x3ff);
    if exponent == 0 {
        // Zero or subnormal: mantissa × 2^-24.
        let magnitude = mantissa as f32 * 2f32.powi(-24);
        return if sign == 0 { magnitude } else { -magnitude };
    }
    let bits = if exponent == 0x1f {
        sign | 0x7f80_0000 | (mantissa << 13)
    } else {
        sign | ((exponent + 112) << 23) | (mantissa << 13)
    };
    f32::from_bits(bits)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn half_precision_converts_exactly() {
        for (half, single) in [
            (0x0000, 0.0),
            (0x3c00, 1.0),
            (0xc000, -2.0),
            (0x3555, 0.333_251_95),
            (0x7bff, 65504.0),
            (0x0001, 5.960_464_5e-8),
            (0x8001, -5.960_464_5e-8),
        ] {
            assert_eq!(f16_to_f32(half), single, "{half:#06x}");
        }
        assert!(f16_to_f32(0x7c00).is_infinite());
        assert!(f16_to_f32(0x7e00).is_nan());
    }

    #[test]
    fn a_malformed_weights_file_is_a_format_error() {
        for file in [
            &b"\x01"[..],
            b"\xff\x00\x00\x00\x00\x00\x00\x00{}",
            b"\x02\x00\x00\x00\x00\x00\x00\x00{}",
        ] {
            assert!(matches!(half_matrix(file), Err(MeaningError::Format(_))));
        }
    }
}
