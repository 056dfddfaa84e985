//! The on-topic rule's sentence-embedding model, read by the service
//! (src/meaning/), against the reference: the ids and similarities
//! WordLlama's own Python package gives for the same texts
//! (tests/fixtures/meaning_golden.json, written by
//! scripts/meaning_golden.py). Uses the model `make` unpacks.

use rigger_inference::{config::cache_dir, meaning::Meaning};
use serde::Deserialize;

#[derive(Deserialize)]
struct Golden {
    tokens: Vec<Tokens>,
    similarities: Vec<Similarity>,
}

#[derive(Deserialize)]
struct Tokens {
    text: String,
    ids: Vec<u32>,
}

#[derive(Deserialize)]
struct Similarity {
    a: String,
    b: String,
    cosine: f32,
}

fn golden() -> Golden {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/meaning_golden.json"
    );
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

fn model() -> Meaning {
    Meaning::load(&cache_dir().join("models/wordllama-l2-supercat-256")).unwrap()
}

#[test]
fn texts_get_the_reference_tokens_and_similarities() {
    let (golden, model) = (golden(), model());
    for expected in &golden.tokens {
        assert_eq!(
            model.token_ids(&expected.text),
            expected.ids,
            "{:?}",
            expected.text
        );
    }
    for pair in &golden.similarities {
        let cosine = model.embed(&pair.a).similarity(&model.embed(&pair.b));
        assert!(
            (cosine - pair.cosine).abs() < 1e-3,
            "{:?} ~ {:?}: {cosine}, reference {}",
            pair.a,
            pair.b,
            pair.cosine
        );
    }
}

#[test]
fn a_missing_model_names_the_file_it_looked_for() {
    let dir = std::env::temp_dir().join("rigger-no-such-meaning-model");
    let error = Meaning::load(&dir).err().expect("there is no model there");
    assert!(error.to_string().contains("tokenizer.json"), "{error}");
}
