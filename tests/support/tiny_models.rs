//! The tiny random-weight GGUF models of several llama.cpp architectures that
//! `scripts/tiny_gguf.py` writes into `$RIGGER_CACHE_DIR/test-models` (run by
//! `scripts/setup-python.sh`): 2 layers, hidden 64, SmolLM2's tokenizer and
//! chat template, so they serve like the real model but answer noise.

use std::path::PathBuf;

use rigger_inference::config::cache_dir;

/// The directory of the tiny models; kept apart from `models/`, which
/// `make run` serves.
pub fn test_models_dir() -> PathBuf {
    cache_dir().join("test-models")
}

/// Name the embedded engine serves a tiny model under (its file stem).
pub fn tiny_model_name(architecture: &str) -> String {
    format!("tiny-{architecture}")
}

/// Path of the tiny model of one architecture (`general.architecture`:
/// llama, qwen2, qwen3, phi3, gemma, starcoder2).
pub fn tiny_model(architecture: &str) -> PathBuf {
    let path = test_models_dir().join(format!("{}.gguf", tiny_model_name(architecture)));
    assert!(
        path.exists(),
        "{} is missing: run `make test` (or scripts/setup-python.sh) first",
        path.display()
    );
    path
}
