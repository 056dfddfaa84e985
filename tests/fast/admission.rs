//! Admission and priorities: beyond the running and waiting calls a call is
//! refused at once with RESOURCE_EXHAUSTED and a retry hint; waiting
//! interactive calls go before batch ones; slots come back when calls end
//! or their clients leave; a burst of 64 clients sees only successes and
//! RESOURCE_EXHAUSTED, and every slot and task comes back.

use std::time::{Duration, Instant};

use rigger_inference::server::{PRIORITY_HEADER, RETRY_AFTER};
use tonic::{Code, Request};

use super::{serve, streaming, until, until_admission};
use crate::support::{
    TestServer, admission, collect, generate, greedy,
    scripted::{Reply, ScriptedBackend},
};

/// How fast a refusal must come: it never waits for a slot.
const AT_ONCE: Duration = Duration::from_millis(500);

fn with_priority(
    prompt: &str,
    priority: &str,
) -> Request<rigger_inference::proto::GenerateRequest> {
    let mut request = Request::new(greedy(prompt, 8));
    request
        .metadata_mut()
        .insert(PRIORITY_HEADER, priority.parse().expect("ASCII"));
    request
}

#[tokio::test]
async fn past_the_queue_calls_are_refused_at_once_and_slots_come_back() {
    let backend = ScriptedBackend::new("first");
    backend.always(Reply::hang());
    let server = serve(&["--max-in-flight", "1", "--max-queue", "1"], &[&backend]).await;
    let mut client = server.client().await;

    let running = client
        .generate(greedy("running", 8))
        .await
        .expect("admitted");
    let mut waiting_client = client.clone();
    let waiting = tokio::spawn(async move { waiting_client.generate(greedy("waiting", 8)).await });
    until_admission(&client, 1, 1).await;

    let asked = Instant::now();
    let refused = client
        .generate(greedy("refused", 8))
        .await
        .expect_err("no room left");
    assert!(
        asked.elapsed() < AT_ONCE,
        "refused at once: {:?}",
        asked.elapsed()
    );
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    let retry_after: u64 = refused
        .metadata()
        .get(RETRY_AFTER)
        .expect("a retry hint")
        .to_str()
        .expect("ASCII")
        .parse()
        .expect("whole seconds");
    assert!(retry_after >= 1);
    assert_eq!(admission(&mut client).await, (1, 1, 1));
    assert_eq!(
        backend.requests().len(),
        1,
        "only the running call reached it"
    );

    // The running call's client leaves: the backend stops, and its slot
    // goes to the waiting call.
    drop(running);
    backend.dropped(1).await;
    let admitted = waiting.await.expect("no panic").expect("admitted");
    backend.started(2).await;
    drop(admitted);
    backend.dropped(2).await;
    until_admission(&client, 0, 0).await;
    backend.always(Reply::text(["Hi"]));
    let served = generate(&mut client, greedy("again", 8)).await;
    assert!(served.is_ok(), "admitted again: {served:?}");
}

#[tokio::test]
async fn waiting_interactive_calls_go_before_batch_calls_that_came_first() {
    let backend = ScriptedBackend::new("first");
    backend.next(Reply::text(["Hello", " world"]).held_after(1));
    let server = serve(&["--max-in-flight", "1", "--max-queue", "4"], &[&backend]).await;
    let mut client = server.client().await;
    let running = streaming(&mut client, "running").await;

    let mut batch_client = client.clone();
    let batch = tokio::spawn(async move {
        collect(
            batch_client
                .generate(with_priority("batch", "batch"))
                .await?
                .into_inner(),
        )
        .await
    });
    until_admission(&client, 1, 1).await;
    let mut interactive_client = client.clone();
    let interactive = tokio::spawn(async move {
        let request = with_priority("interactive", "interactive");
        collect(interactive_client.generate(request).await?.into_inner()).await
    });
    until_admission(&client, 1, 2).await;

    backend.release(1);
    collect(running).await.expect("the running call ends");
    interactive.await.expect("no panic").expect("served");
    batch.await.expect("no panic").expect("served");
    let order: Vec<String> = backend
        .requests()
        .iter()
        .map(|request| request.messages.last().expect("a prompt").content.clone())
        .collect();
    assert_eq!(order, ["running", "interactive", "batch"]);

    let status = client
        .generate(with_priority("urgent", "urgent"))
        .await
        .expect_err("an unknown priority");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains(PRIORITY_HEADER), "{status:?}");
    assert_eq!(backend.requests().len(), 3, "refused before the backend");
}

const CLIENTS: usize = 64;

/// Tasks alive in this test's runtime, where the server runs too.
fn alive_tasks() -> usize {
    tokio::runtime::Handle::current()
        .metrics()
        .num_alive_tasks()
}

/// One call per client at once, each held by the backend until `running`
/// run and `queued` wait (the rest refused); then all are let go. Returns
/// the status codes.
async fn burst(
    server: &TestServer,
    backend: &ScriptedBackend,
    running: u64,
    queued: u64,
) -> Vec<Code> {
    let mut calls = Vec::with_capacity(CLIENTS);
    for index in 0..CLIENTS {
        let mut client = server.client().await;
        calls.push(tokio::spawn(async move {
            match generate(&mut client, greedy(&format!("call {index}"), 4)).await {
                Ok(_) => Code::Ok,
                Err(status) => status.code(),
            }
        }));
    }
    let mut client = server.client().await;
    let refused = CLIENTS as u64 - running - queued;
    until("every call is running, waiting or refused", || {
        let mut client = client.clone();
        async move { admission(&mut client).await == (running, queued, refused) }
    })
    .await;
    backend.release(CLIENTS);
    let mut codes = Vec::with_capacity(CLIENTS);
    for call in calls {
        codes.push(call.await.expect("no panic"));
    }
    until_admission(&client, 0, 0).await;
    assert_eq!(admission(&mut client).await.2, refused);
    codes
}

#[tokio::test]
async fn a_burst_below_capacity_all_succeeds_and_above_it_only_resource_exhausted() {
    let roomy_backend = ScriptedBackend::new("first");
    roomy_backend.always(Reply::text(["Hi"]).held_after(0));
    let roomy = serve(
        &["--max-in-flight", "4", "--max-queue", "64"],
        &[&roomy_backend],
    )
    .await;
    let codes = burst(&roomy, &roomy_backend, 4, CLIENTS as u64 - 4).await;
    assert!(codes.iter().all(|code| *code == Code::Ok), "{codes:?}");
    drop(roomy);

    let backend = ScriptedBackend::new("first");
    backend.always(Reply::text(["Hi"]).held_after(0));
    let tight = serve(&["--max-in-flight", "4", "--max-queue", "8"], &[&backend]).await;
    let before = alive_tasks();
    let codes = burst(&tight, &backend, 4, 8).await;
    let succeeded = codes.iter().filter(|code| **code == Code::Ok).count();
    let refused = codes
        .iter()
        .filter(|code| **code == Code::ResourceExhausted)
        .count();
    assert_eq!((succeeded, refused), (12, CLIENTS - 12), "{codes:?}");
    assert_eq!(
        backend.streams().finished,
        12,
        "every admitted call ran to its end"
    );
    until("the burst's tasks (connections, relays) are gone", || {
        let alive = alive_tasks();
        async move { alive <= before }
    })
    .await;
}
