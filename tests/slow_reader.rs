//! A client that reads slowly bounds what its call queues and holds no other
//! call back, on the runtimes that serve many calls from one producer (the
//! embedded engine thread, the MLX worker): one call is left unread while
//! another runs to its end; the unread call then holds at most a relay's
//! worth of chunks, and once read it gives the same greedy answer.
//!
//! Each test prints the figures (queued chunks and bytes, slow and fast
//! reader): `cargo test --test slow_reader -- --nocapture`.

mod support;

use std::time::Duration;

use clap::Parser;
use futures_util::{FutureExt, StreamExt};
use rigger_inference::{
    backend::{
        Backend, Chunk, ChunkStream, GenerationRequest, Message, RELAY_CAPACITY, Role, Sampling,
        embedded::{EmbeddedBackend, EmbeddedSettings, EngineShape},
        mlx::{MlxBackend, MlxSettings},
    },
    config::Config,
};

/// Enough tokens that an unbounded relay would queue several relays' worth.
const ANSWER_TOKENS: u32 = 4 * RELAY_CAPACITY as u32;
/// Chunks a producer may send after it last saw room: the embedded engine
/// sends at most three in a step (text, held-back text, end); the MLX
/// worker's pause reaches it after the replies already in the pipe.
const EMBEDDED_SLACK: usize = 3;
const MLX_SLACK: usize = 8;
/// Bounds each test: a producer stalled by the unread call would never let
/// the other call finish.
const LIMIT: Duration = Duration::from_secs(300);

fn counting() -> GenerationRequest {
    GenerationRequest {
        model: None,
        messages: vec![Message::new(
            Role::User,
            "Count from 1 to 500, one number per line.",
        )],
        sampling: Sampling {
            max_tokens: ANSWER_TOKENS,
            temperature: Some(0.0),
            ..Sampling::default()
        },
        stop: Vec::new(),
        json_schema: None,
        session: None,
    }
}

/// A stream read to its end: its text, chunk count, and the most chunks it
/// ever had queued when read as fast as it comes.
struct Read {
    text: String,
    chunks: usize,
    most_queued: usize,
}

async fn read_all(mut stream: ChunkStream) -> Read {
    let mut read = Read {
        text: String::new(),
        chunks: 0,
        most_queued: 0,
    };
    loop {
        read.most_queued = read.most_queued.max(stream.size_hint().0);
        match stream.next().await.expect("a stream ends with Done") {
            Ok(Chunk::Text(text)) => {
                read.chunks += 1;
                read.text.push_str(&text);
            }
            Ok(Chunk::Done(_)) => return read,
            Err(error) => panic!("generation failed: {error}"),
        }
    }
}

/// Leaves one call unread while another completes; checks and prints what
/// the unread one queued.
async fn a_slow_reader_is_bounded(backend: &dyn Backend, slack: usize) {
    let mut slow = backend.generate(counting()).await.unwrap();
    // The slow call has started generating before the fast one comes.
    let first = match slow.next().await {
        Some(Ok(Chunk::Text(text))) => text,
        other => panic!("expected text first, got {other:?}"),
    };
    let fast = read_all(backend.generate(counting()).await.unwrap()).await;

    let queued = slow.size_hint().0;
    let mut queued_bytes = 0;
    let mut text = first;
    for _ in 0..queued {
        match slow.next().now_or_never() {
            Some(Some(Ok(Chunk::Text(chunk)))) => {
                queued_bytes += chunk.len();
                text.push_str(&chunk);
            }
            other => panic!("a queued chunk was not ready: {other:?}"),
        }
    }
    let rest = read_all(slow).await;
    text.push_str(&rest.text);
    println!(
        "{}: slow reader queued {queued} chunks ({queued_bytes} bytes) of an answer of {} chunks \
         ({} bytes); fast reader at most {} queued",
        backend.name(),
        fast.chunks,
        fast.text.len(),
        fast.most_queued
    );
    assert!(
        queued <= RELAY_CAPACITY + slack,
        "{queued} chunks queued for a client that did not read"
    );
    assert!(
        fast.chunks > RELAY_CAPACITY + slack,
        "the answer ({} chunks) must be longer than the bound to test it",
        fast.chunks
    );
    assert_eq!(
        text, fast.text,
        "the paused call gives the same greedy answer"
    );
}

async fn embedded() -> EmbeddedBackend {
    EmbeddedBackend::load(
        EmbeddedSettings::one_model(
            &support::model_path(),
            EngineShape {
                parallel: 2,
                ctx_per_sequence: 1024,
                batch_tokens: 512,
                threads: 1,
                flash_attention: false,
            },
            2,
        )
        .expect("the model's metadata reads"),
    )
    .await
    .expect("load the model")
}

#[tokio::test]
async fn a_slow_reader_bounds_its_queue_on_the_embedded_engine() {
    let backend = embedded().await;
    tokio::time::timeout(LIMIT, a_slow_reader_is_bounded(&backend, EMBEDDED_SLACK))
        .await
        .expect("the fast call finished while the slow one was unread");
}

/// A call whose client stopped reading, once another call ran to its end
/// meanwhile: by then the engine skips it.
async fn blocked_call(backend: &dyn Backend) -> ChunkStream {
    let mut slow = backend.generate(counting()).await.unwrap();
    assert!(matches!(slow.next().await, Some(Ok(Chunk::Text(_)))));
    read_all(backend.generate(counting()).await.unwrap()).await;
    assert!(
        slow.size_hint().0 >= RELAY_CAPACITY,
        "the call waits for its client"
    );
    slow
}

#[tokio::test]
async fn a_call_waiting_for_its_client_can_be_dropped_and_the_embedded_engine_stopped() {
    let backend = embedded().await;
    tokio::time::timeout(LIMIT, async move {
        drop(blocked_call(&backend).await);
        read_all(backend.generate(counting()).await.unwrap()).await;

        // A model stays loaded while a call holds it: the engine stops
        // when the backend and the last call are gone, here a call still
        // waiting for its client.
        let waiting = blocked_call(&backend).await;
        tokio::task::spawn_blocking(move || {
            drop(backend);
            drop(waiting);
        })
        .await
        .unwrap();
    })
    .await
    .expect("the engine stopped with a call waiting for its client");
}

async fn mlx() -> MlxBackend {
    let config = Config::parse_from(["rigger-inference", "--backend", "mlx"]);
    MlxBackend::start(MlxSettings::one_model(rigger_inference::app::mlx_worker(
        &config,
    )))
    .await
    .expect("start the MLX worker")
}

#[tokio::test]
async fn a_slow_reader_bounds_its_queue_on_the_mlx_worker() {
    let backend = mlx().await;
    tokio::time::timeout(LIMIT, a_slow_reader_is_bounded(&backend, MLX_SLACK))
        .await
        .expect("the fast call finished while the slow one was unread");
}

#[tokio::test]
async fn a_paused_call_can_be_dropped_on_the_mlx_worker() {
    let backend = mlx().await;
    tokio::time::timeout(LIMIT, async {
        drop(blocked_call(&backend).await);
        let after = read_all(backend.generate(counting()).await.unwrap()).await;
        assert!(after.chunks > RELAY_CAPACITY);
    })
    .await
    .expect("the worker serves on after a paused call was dropped");
}
