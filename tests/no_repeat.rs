//! The n-gram ban (`Sampling.no_repeat`, set by the task layer) on the two
//! runtimes that advertise it: the MLX worker bans what the embedded engine
//! bans, so with the same greedy model both leave the unbanned answer at the
//! same token.

mod support;

use clap::Parser;
use futures_util::StreamExt;
use rigger_inference::{
    backend::{
        Backend, Chunk, GenerationRequest, Message, NoRepeat, Role, Sampling,
        embedded::{EmbeddedBackend, EmbeddedSettings, EngineShape},
        mlx::{MlxBackend, MlxSettings},
    },
    config::Config,
};

/// Short: the runtimes' greedy answers agree token for token only while the
/// model is sure; once a ban has turned an answer off its likely path, the
/// runtimes' float rounding can tip its close choices apart.
const ANSWER_TOKENS: u32 = 12;

fn repetitive(no_repeat: Option<NoRepeat>) -> GenerationRequest {
    GenerationRequest {
        model: None,
        // A system message of our own: the runtimes' chat templates differ
        // in the one they add when there is none.
        messages: vec![
            Message::new(Role::System, "You are a helpful assistant."),
            Message::new(Role::User, "Count from 1 to 500, one number per line."),
        ],
        sampling: Sampling {
            max_tokens: ANSWER_TOKENS,
            temperature: Some(0.0),
            no_repeat,
            ..Sampling::default()
        },
        stop: Vec::new(),
        json_schema: None,
        session: None,
    }
}

/// The two halves of the rule, each alone: repeated n-grams of the
/// answer, and texts named as already said.
fn bans() -> [NoRepeat; 2] {
    [
        NoRepeat {
            ngram: 2,
            already_said: Vec::new(),
        },
        NoRepeat {
            // Longer than the answer: only the said text is banned.
            ngram: ANSWER_TOKENS + 1,
            already_said: vec!["1\n2".to_owned()],
        },
    ]
}

async fn answer(backend: &dyn Backend, request: GenerationRequest) -> String {
    let mut stream = backend.generate(request).await.unwrap();
    let mut text = String::new();
    while let Some(item) = stream.next().await {
        match item.unwrap() {
            Chunk::Text(chunk) => text.push_str(&chunk),
            Chunk::Done(_) => return text,
        }
    }
    panic!("the stream ended without Done")
}

#[tokio::test]
async fn the_mlx_worker_bans_the_ngrams_the_embedded_engine_bans() {
    let embedded = EmbeddedBackend::load(
        EmbeddedSettings::one_model(
            &support::model_path(),
            EngineShape {
                parallel: 1,
                ctx_per_sequence: 1024,
                batch_tokens: 512,
                threads: 1,
                flash_attention: false,
            },
            1,
        )
        .expect("the model's metadata reads"),
    )
    .await
    .expect("load the model");
    let config = Config::parse_from(["rigger-inference", "--backend", "mlx"]);
    let mlx = MlxBackend::start(MlxSettings::one_model(rigger_inference::app::mlx_worker(
        &config,
    )))
    .await
    .expect("start the MLX worker");
    assert!(embedded.capabilities().no_repeat);
    assert!(mlx.capabilities().no_repeat);

    let free = answer(&mlx, repetitive(None)).await;
    assert_eq!(
        free,
        answer(&embedded, repetitive(None)).await,
        "the runtimes agree without the ban (so any difference below is the ban's)"
    );
    for ban in bans() {
        let banned = answer(&mlx, repetitive(Some(ban.clone()))).await;
        let reference = answer(&embedded, repetitive(Some(ban.clone()))).await;
        println!("without a ban: {free:?}\nwith {ban:?}: MLX {banned:?}, embedded {reference:?}");
        assert_ne!(free, banned, "the ban changes a repetitive answer");
        assert_eq!(
            common_prefix(&free, &banned),
            common_prefix(&free, &reference),
            "both runtimes leave the unbanned answer at the same token"
        );
    }
}

/// Bytes two texts share from their start.
fn common_prefix(a: &str, b: &str) -> usize {
    a.bytes().zip(b.bytes()).take_while(|(a, b)| a == b).count()
}
