//! Deadlines: the client's gRPC deadline (or the server's default, at most
//! its maximum) bounds every call, streams and the wait for a slot
//! included; past it the call ends with DEADLINE_EXCEEDED and the backend's
//! stream is dropped, which is how a runtime learns to stop.
//!
//! Where the client is waiting for response headers (unary calls, a call
//! waiting for a slot), tonic's client enforces a deadline it set itself
//! and may give up first, under load; those cases use the server's default
//! deadline instead, so that what is seen is the server's doing.

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use rigger_inference::proto::{
    DecomposeTaskRequest, EnhanceTaskRequest, GenerateRequest, Task, generate_response::Event,
};
use tonic::{Code, Request, Status};

use super::{serve, until_admission};
use crate::support::{
    generate, greedy,
    scripted::{End, Reply, ScriptedBackend},
};

const DEADLINE: Duration = Duration::from_millis(300);
const AN_HOUR: Duration = Duration::from_secs(3600);
/// Well past the deadlines here, well short of a hanging call.
const SOON_AFTER: Duration = Duration::from_secs(3);

fn with_deadline<T>(message: T, deadline: Duration) -> Request<T> {
    let mut request = Request::new(message);
    request.set_timeout(deadline);
    request
}

fn task() -> Option<Task> {
    Some(Task {
        title: "Plan a database migration".into(),
        ..Default::default()
    })
}

fn assert_expired(status: &Status) {
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert!(status.message().contains("deadline"), "{status:?}");
}

/// Reads a stream until its error, returning the text before it.
async fn text_before_error(
    request: Request<GenerateRequest>,
    client: &mut super::Client,
) -> (String, Status) {
    let mut stream = client.generate(request).await.expect("starts").into_inner();
    let mut text = String::new();
    loop {
        match stream
            .next()
            .await
            .expect("ends with an error, not silently")
        {
            Ok(message) => match message.event.expect("an event") {
                Event::Text(piece) => text.push_str(&piece),
                Event::Summary(summary) => panic!("no summary past the deadline: {summary:?}"),
            },
            Err(status) => return (text, status),
        }
    }
}

#[tokio::test]
async fn unary_calls_end_at_the_deadline_and_drop_the_backend_stream() {
    let backend = ScriptedBackend::new("first");
    backend.always(Reply::hang());
    let server = serve(&["--default-deadline", "300ms"], &[&backend]).await;
    let mut client = server.client().await;

    let started = Instant::now();
    let status = client
        .enhance_task(EnhanceTaskRequest {
            task: task(),
            ..Default::default()
        })
        .await
        .expect_err("the backend never answers");
    assert_expired(&status);
    assert!(started.elapsed() < SOON_AFTER, "{:?}", started.elapsed());
    backend.dropped(1).await;

    let status = client
        .decompose_task(DecomposeTaskRequest {
            task: task(),
            ..Default::default()
        })
        .await
        .expect_err("the backend never answers");
    assert_expired(&status);
    backend.dropped(2).await;
}

#[tokio::test]
async fn a_stream_ends_at_the_deadline_after_the_text_sent_so_far() {
    let backend = ScriptedBackend::new("first");
    backend.always(Reply::text(["Once upon"]).then(End::Hang));
    let server = serve(&[], &[&backend]).await;
    let mut client = server.client().await;
    let started = Instant::now();
    let (text, status) =
        text_before_error(with_deadline(greedy("A story", 64), DEADLINE), &mut client).await;
    assert_eq!(text, "Once upon");
    assert_expired(&status);
    assert!(started.elapsed() < SOON_AFTER, "{:?}", started.elapsed());
    let streams = backend.dropped(1).await;
    assert_eq!(streams.finished, 0);
}

#[tokio::test]
async fn calls_get_the_servers_default_deadline_and_at_most_its_maximum() {
    let backend = ScriptedBackend::new("first");
    backend.always(Reply::text(["Once upon"]).then(End::Hang));
    let server = serve(
        &["--default-deadline", "300ms", "--max-deadline", "500ms"],
        &[&backend],
    )
    .await;
    let mut client = server.client().await;
    let started = Instant::now();
    let (_, status) = text_before_error(Request::new(greedy("A story", 64)), &mut client).await;
    assert_expired(&status);
    assert!(started.elapsed() < SOON_AFTER, "the default applies");

    let started = Instant::now();
    let (_, status) =
        text_before_error(with_deadline(greedy("A story", 64), AN_HOUR), &mut client).await;
    assert_expired(&status);
    assert!(started.elapsed() < SOON_AFTER, "the maximum applies");
    backend.dropped(2).await;
}

#[tokio::test]
async fn a_call_waiting_for_a_slot_leaves_the_queue_at_its_deadline() {
    let backend = ScriptedBackend::new("first");
    backend.always(Reply::hang());
    let server = serve(
        &[
            "--max-in-flight",
            "1",
            "--max-queue",
            "1",
            "--default-deadline",
            "300ms",
        ],
        &[&backend],
    )
    .await;
    let mut client = server.client().await;
    // The running call's own deadline is far off.
    let _running = client
        .generate(with_deadline(greedy("running", 8), AN_HOUR))
        .await
        .expect("admitted");
    for attempt in ["waiting", "waiting again"] {
        let status = client
            .generate(greedy(attempt, 8))
            .await
            .expect_err("no slot frees up in time");
        assert_expired(&status);
        until_admission(&client, 1, 0).await;
    }
    assert_eq!(
        backend.requests().len(),
        1,
        "the late calls never reached it"
    );
}

#[tokio::test]
async fn a_backend_that_answers_within_the_deadline_is_not_cut() {
    const THINKING: Duration = Duration::from_millis(50);
    let backend = ScriptedBackend::new("first");
    backend.always(Reply::text(["Hello", " world"]).after(THINKING));
    let server = serve(&["--default-deadline", "5s"], &[&backend]).await;
    let mut client = server.client().await;
    let answer = generate(&mut client, greedy("Hi", 8))
        .await
        .expect("answered in time");
    assert_eq!(answer.text, "Hello world");
    let meta = answer.summary.meta.expect("meta");
    let first_token = meta.time_to_first_token.expect("a first-token time");
    assert!(
        Duration::try_from(first_token).expect("not negative") >= THINKING,
        "the first token came after the backend's delay: {first_token:?}"
    );
    assert_eq!(backend.streams().finished, 1);
}
