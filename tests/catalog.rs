//! The model catalog over real models: the SmolLM2 GGUF the other tests
//! serve, and tiny MLX models built with mlx-lm's own classes (one of them
//! quantized by mlx-lm's converter), scanned under several names.

mod support;

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use rigger_inference::backend::catalog::{Catalog, ModelEntry, ModelFacts, ModelFormat};

/// SmolLM2-135M-Instruct.Q4_1's facts as PyPI gguf 0.19.0's `GGUFReader`
/// reads them: `general.architecture`, `llama.context_length`,
/// `llama.block_count`, `llama.attention.head_count_kv` (3) ×
/// `llama.embedding_length` (576) / `llama.attention.head_count` (9), the sum
/// of `np.prod(t.shape)` over `reader.tensors`, and the type holding the most
/// elements (Q4_1 106,168,320; Q8_0 28,311,552; F32 35,136).
fn smollm2_facts() -> ModelFacts {
    ModelFacts {
        architecture: "llama".into(),
        parameters: 134_515_008,
        quantization: "Q4_1".into(),
        context_length: 8192,
        layers: 30,
        kv_width: 3 * 64,
    }
}

/// Parameters of tests/support/tiny_mlx_model.py's phi3: the sum of the
/// tensor shapes in its model.safetensors (read with Python's json/struct).
const TINY_PHI3_PARAMETERS: u64 = 107_200;

/// A fresh directory for one test, removed when it ends.
struct Scratch(PathBuf);

impl Scratch {
    fn new(label: &str) -> Self {
        let path =
            std::env::temp_dir().join(format!("rigger-catalog-{label}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path).expect("create scratch dir");
        Self(path)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn python(args: &[&str]) {
    let status = Command::new(support::python())
        .args(args)
        .status()
        .expect("run the venv's python");
    assert!(status.success(), "python {args:?}");
}

/// tests/support/tiny_mlx_model.py's phi3 in `dir/tiny-phi3`, and its 4-bit
/// conversion by mlx-lm in `dir/tiny-phi3-4bit`.
fn tiny_phi3_models(dir: &Path) -> (PathBuf, PathBuf) {
    let plain = dir.join("tiny-phi3");
    let quantized = dir.join("tiny-phi3-4bit");
    let script = support::repo_path("tests/support/tiny_mlx_model.py");
    python(&[script.to_str().unwrap(), "phi3", plain.to_str().unwrap()]);
    let convert = format!(
        "from mlx_lm import convert; convert({:?}, mlx_path={:?}, quantize=True, q_bits=4, q_group_size=32)",
        plain.display(),
        quantized.display()
    );
    python(&["-c", &convert]);
    (plain, quantized)
}

#[test]
fn reads_smollm2_facts_from_its_gguf_header() {
    let path = support::model_path();
    let entry = ModelEntry::read("smollm2", &path).expect("read SmolLM2");
    assert_eq!(entry.format, ModelFormat::Gguf);
    assert_eq!(entry.facts, smollm2_facts());
    assert_eq!(entry.size_bytes, fs::metadata(&path).expect("stat").len());
    // 2 (K, V) × 30 layers × 192 × 2 bytes per position.
    assert_eq!(entry.kv_bytes(8192), 2 * 30 * 192 * 2 * 8192);
}

#[test]
fn scans_one_gguf_under_two_names_an_alias_and_mlx_models() {
    let scratch = Scratch::new("scan");
    let dir = scratch.0.join("models");
    fs::create_dir_all(&dir).expect("mkdir");
    let model = support::model_path();
    std::os::unix::fs::symlink(&model, dir.join("smol-a.gguf")).expect("symlink");
    std::os::unix::fs::symlink(&model, dir.join("smol-b.gguf")).expect("symlink");
    let (plain, quantized) = tiny_phi3_models(&dir);

    let aliases = [
        ("smollm2".to_owned(), dir.join("smol-a.gguf")),
        ("tiny".to_owned(), plain.clone()),
    ];
    let (catalog, skipped) = Catalog::scan(Some(&dir), &aliases, None).expect("scan");
    assert!(skipped.is_empty(), "{skipped:?}");
    let names: Vec<&str> = catalog.entries().iter().map(|e| e.name.as_str()).collect();
    assert_eq!(names, ["smol-b", "smollm2", "tiny", "tiny-phi3-4bit"]);

    for name in ["smol-b", "smollm2"] {
        assert_eq!(catalog.get(name).expect(name).facts, smollm2_facts());
    }

    let tiny = catalog.get("tiny").expect("tiny");
    assert_eq!(tiny.format, ModelFormat::Mlx);
    assert_eq!(tiny.path, plain);
    assert_eq!(
        tiny.facts,
        ModelFacts {
            architecture: "phi3".into(),
            parameters: TINY_PHI3_PARAMETERS,
            quantization: "f32".into(),
            context_length: 4096,
            layers: 2,
            kv_width: 2 * (64 / 4),
        }
    );

    let four_bit = catalog.get("tiny-phi3-4bit").expect("4-bit");
    assert_eq!(four_bit.path, quantized);
    assert_eq!(four_bit.facts.quantization, "4-bit");
    assert_eq!(
        four_bit.facts.parameters, TINY_PHI3_PARAMETERS,
        "packed 4-bit weights count as the model's parameters"
    );
    assert!(four_bit.size_bytes < tiny.size_bytes);

    let unknown = catalog.get("smol").expect_err("unknown");
    assert_eq!(unknown.closest[..2], ["smol-b", "smollm2"]);
}
