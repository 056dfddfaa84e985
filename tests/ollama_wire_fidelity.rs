//! The Ollama stand-in speaks Ollama's wire format: checked with Ollama's
//! official Python client, whose typed response models reject a wrong shape.

mod support;

use std::process::Command;

use support::{llama, ollama::OllamaStandIn, python, repo_path};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_ollama_client_accepts_the_stand_in() {
    let stand_in = OllamaStandIn::start(&llama().openai_url()).await;
    let host = stand_in.host();
    let output = tokio::task::spawn_blocking(move || {
        Command::new(python())
            .arg(repo_path("tests/python/ollama_fidelity.py"))
            .arg(host)
            .output()
            .expect("run the fidelity script")
    })
    .await
    .expect("script thread");
    assert!(
        output.status.success(),
        "ollama client rejected the stand-in:\n{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("fidelity ok"), "{stdout}");
}
