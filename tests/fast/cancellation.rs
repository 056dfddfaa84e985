//! Relay cancellation: a client that leaves (drops its Generate stream, or
//! gives up on a call before its first token or its unary answer) makes the
//! service drop the backend's stream, which is how a runtime learns to stop,
//! and gives its generation slot back.

use futures_util::StreamExt;
use rigger_inference::proto::{EnhanceTaskRequest, Task};

use std::future::Future;

use super::{Client, serve, streaming, until_admission};
use crate::support::{
    generate, greedy,
    scripted::{End, Reply, ScriptedBackend},
};

#[tokio::test]
async fn dropping_a_stream_mid_generation_stops_the_backend_and_frees_the_slot() {
    let backend = ScriptedBackend::new("first");
    backend.next(Reply::text(["Once", " upon"]).then(End::Hang));
    let server = serve(&["--max-in-flight", "1"], &[&backend]).await;
    let mut client = server.client().await;
    drop(streaming(&mut client, "A long story").await);
    let streams = backend.dropped(1).await;
    assert_eq!(streams.finished, 0);
    until_admission(&client, 0, 0).await;
    generate(&mut client, greedy("Hi", 4))
        .await
        .expect("the only slot serves the next call");
}

/// Makes `call` (to a backend that never answers) give up once the backend
/// has its request, and checks that the backend stream is dropped and the
/// slot freed.
async fn leave<F, T>(call: impl FnOnce(Client) -> F)
where
    F: Future<Output = T> + Send + 'static,
    T: Send + 'static,
{
    let backend = ScriptedBackend::new("first");
    backend.always(Reply::hang());
    let server = serve(&[], &[&backend]).await;
    let client = server.client().await;
    let call = tokio::spawn(call(client.clone()));
    backend.started(1).await;
    call.abort();
    backend.dropped(1).await;
    until_admission(&client, 0, 0).await;
}

#[tokio::test]
async fn leaving_before_the_first_token_stops_the_backend() {
    leave(|mut caller| async move {
        let mut stream = caller
            .generate(greedy("A long prompt", 8))
            .await?
            .into_inner();
        stream.next().await.transpose()
    })
    .await;
}

#[tokio::test]
async fn leaving_a_unary_call_stops_the_backend() {
    leave(|mut caller| async move {
        caller
            .enhance_task(EnhanceTaskRequest {
                task: Some(Task {
                    title: "Ship the release".into(),
                    ..Default::default()
                }),
                ..Default::default()
            })
            .await
    })
    .await;
}
