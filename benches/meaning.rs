//! The on-topic check's cost: loading the sentence-embedding model
//! (src/meaning/) and embedding texts the size of answer parts, over the
//! eval corpus's task texts and their first sentences. Prints figures.
//!
//! Run: `make bench-meaning` (or `cargo bench --bench meaning` after setup).

use std::time::Instant;

use rigger_inference::{config::cache_dir, meaning::Meaning};
use serde::Deserialize;

/// Times every text is embedded, for a stable mean.
const ROUNDS: usize = 200;

#[derive(Deserialize)]
struct CorpusTask {
    title: String,
    description: Option<String>,
}

fn main() {
    let corpus: Vec<CorpusTask> = serde_json::from_slice(
        &std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/eval/tasks.json")).unwrap(),
    )
    .unwrap();
    // Answer parts are a sentence or two: the task title with the first
    // sentence of its description stands in for one.
    let parts: Vec<String> = corpus
        .iter()
        .map(|task| {
            let first = task
                .description
                .as_deref()
                .unwrap_or("")
                .split(". ")
                .next()
                .unwrap_or("");
            format!("{}. {first}", task.title)
        })
        .collect();

    let started = Instant::now();
    let model = Meaning::load(&cache_dir().join("models/wordllama-l2-supercat-256"))
        .expect("the on-topic model (`make` unpacks it)");
    let load = started.elapsed();

    let tokens: usize = parts.iter().map(|part| model.token_ids(part).len()).sum();
    let started = Instant::now();
    let mut checksum = 0f32;
    for _ in 0..ROUNDS {
        for part in &parts {
            checksum += model.embed(part).similarity(&model.embed(&parts[0]));
        }
    }
    let per_pair = started.elapsed() / (ROUNDS * parts.len()) as u32;
    println!("on-topic model: loaded in {load:.0?}");
    println!(
        "{} parts, {:.1} tokens each: {per_pair:.1?} per similarity (two texts embedded) (checksum {checksum:.1})",
        parts.len(),
        tokens as f64 / parts.len() as f64
    );
}
