//! The byte-fallback BPE tokenizer of a static embedding model, read from
//! its Hugging Face `tokenizer.json`: the SentencePiece style of Llama 2,
//! whose words start with `▁` and whose unknown characters fall back to
//! their UTF-8 bytes (`<0x0A>`). It gives the ids the model's own tokenizer
//! gives (tests/meaning.rs checks them against the reference).

use std::collections::HashMap;

use serde::Deserialize;

use super::MeaningError;

/// What stands for a space in tokens.
const SPACE: char = '\u{2581}';

pub(super) struct Tokenizer {
    vocab: HashMap<String, u32>,
    /// The merge of two adjacent tokens: its rank (lower merges first) and
    /// the token it makes.
    merges: HashMap<(u32, u32), (usize, u32)>,
    /// Ids of `<0x00>`..=`<0xFF>`.
    bytes: Vec<u32>,
}

#[derive(Deserialize)]
struct File {
    normalizer: Option<serde_json::Value>,
    pre_tokenizer: Option<serde_json::Value>,
    model: Model,
}

#[derive(Deserialize)]
struct Model {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    byte_fallback: bool,
    vocab: HashMap<String, u32>,
    merges: Vec<Merge>,
}

/// A merge as `tokenizer.json` writes it: `"a b"` or `["a", "b"]`.
#[derive(Deserialize)]
#[serde(untagged)]
enum Merge {
    Joined(String),
    Pair(String, String),
}

impl Tokenizer {
    pub(super) fn from_json(text: &str) -> Result<Self, MeaningError> {
        let file: File = serde_json::from_str(text)
            .map_err(|error| MeaningError::Format(format!("tokenizer.json: {error}")))?;
        file.check_supported()?;
        let vocab = file.model.vocab;
        let bytes = (0..=255u8)
            .map(|byte| {
                vocab
                    .get(&format!("<0x{byte:02X}>"))
                    .copied()
                    .ok_or_else(|| {
                        MeaningError::Format(format!(
                            "tokenizer.json lacks the byte token <0x{byte:02X}>"
                        ))
                    })
            })
            .collect::<Result<Vec<u32>, _>>()?;
        let id = |token: &str| {
            vocab.get(token).copied().ok_or_else(|| {
                MeaningError::Format(format!("tokenizer.json merges {token:?}, not in its vocab"))
            })
        };
        let mut merges = HashMap::with_capacity(file.model.merges.len());
        for (rank, merge) in file.model.merges.iter().enumerate() {
            let (left, right) = match merge {
                Merge::Joined(text) => text.split_once(' ').ok_or_else(|| {
                    MeaningError::Format(format!("tokenizer.json merge {text:?} is not a pair"))
                })?,
                Merge::Pair(left, right) => (left.as_str(), right.as_str()),
            };
            let made = id(&format!("{left}{right}"))?;
            merges.insert((id(left)?, id(right)?), (rank, made));
        }
        Ok(Self {
            vocab,
            merges,
            bytes,
        })
    }

    /// The token ids of `text`, without special tokens.
    pub(super) fn encode(&self, text: &str) -> Vec<u32> {
        if text.is_empty() {
            return Vec::new();
        }
        let normalized: String = std::iter::once(SPACE)
            .chain(text.chars().map(|c| if c == ' ' { SPACE } else { c }))
            .collect();
        let mut ids = Vec::new();
        for word in words(&normalized) {
            ids.extend(self.merged(self.symbols(word)));
        }
        ids
    }

    /// One token per character, or its bytes where the vocab lacks it.
    fn symbols(&self, word: &str) -> Vec<u32> {
        let mut symbols = Vec::with_capacity(word.len());
        let mut buffer = [0u8; 4];
        for c in word.chars() {
            match self.vocab.get(c.encode_utf8(&mut buffer) as &str) {
                Some(&id) => symbols.push(id),
                None => symbols.extend(
                    c.encode_utf8(&mut buffer)
                        .bytes()
                        .map(|byte| self.bytes[usize::from(byte)]),
                ),
            }
        }
        symbols
    }

    /// Applies the merges, lowest rank first (leftmost among equals), until
    /// none applies.
    fn merged(&self, mut symbols: Vec<u32>) -> Vec<u32> {
        loop {
            let best = symbols
                .windows(2)
                .enumerate()
                .filter_map(|(at, pair)| {
                    self.merges
                        .get(&(pair[0], pair[1]))
                        .map(|&(rank, made)| (rank, at, made))
                })
                .min();
            let Some((_, at, made)) = best else {
                return symbols;
            };
            symbols[at] = made;
            symbols.remove(at + 1);
        }
    }
}

impl File {
    /// Only what [`Tokenizer::encode`] does may be asked for: a BPE model
    /// with byte fallback, no pre-tokenizer, and the normalizer that
    /// prepends `▁` and writes spaces as `▁`.
    fn check_supported(&self) -> Result<(), MeaningError> {
        let unsupported =
            |what: String| Err(MeaningError::Format(format!("tokenizer.json: {what}")));
        if self.model.kind != "BPE" || !self.model.byte_fallback {
            return unsupported(format!(
                "only byte-fallback BPE tokenizers are supported, not {} (byte_fallback {})",
                self.model.kind, self.model.byte_fallback
            ));
        }
        if self.pre_tokenizer.is_some() {
            return unsupported("a pre_tokenizer is not supported".into());
        }
        let expected = serde_json::json!({"type": "Sequence", "normalizers": [
            {"type": "Prepend", "prepend": SPACE.to_string()},
            {"type": "Replace", "pattern": {"String": " "}, "content": SPACE.to_string()},
        ]});
        if self.normalizer.as_ref() != Some(&expected) {
            return unsupported(format!(
                "only the normalizer {expected} is supported, not {}",
                self.normalizer.clone().unwrap_or_default()
            ));
        }
        Ok(())
    }
}

/// `text` cut before each `▁` that follows another character: no token of
/// such a vocab holds `▁` after anything but `▁`, so no merge crosses a cut.
fn words(text: &str) -> impl Iterator<Item = &str> {
    let mut start = 0;
    let mut previous: Option<char> = None;
    let mut cuts = Vec::new();
    for (at, c) in text.char_indices() {
        if c == SPACE && previous.is_some_and(|before| before != SPACE) {
            cuts.push(at);
        }
        previous = Some(c);
    }
    cuts.push(text.len());
    cuts.into_iter().map(move |end| {
        let word = &text[start..end];
        start = end;
        word
    })
}
