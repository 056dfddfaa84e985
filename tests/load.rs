//! 64 concurrent clients on the real embedded engine: below capacity every
//! call succeeds; above it the only failures are RESOURCE_EXHAUSTED, and
//! every slot and every task comes back afterwards.

mod support;

use futures_util::future::join_all;
use support::{TestServer, admission, config, generate, greedy};
use tonic::Code;

const CLIENTS: usize = 64;

/// Runs one short generation per client at once; returns the status codes.
async fn burst(server: &TestServer) -> Vec<Code> {
    let mut clients = Vec::with_capacity(CLIENTS);
    for _ in 0..CLIENTS {
        clients.push(server.client().await);
    }
    join_all(
        clients
            .into_iter()
            .enumerate()
            .map(|(index, mut client)| async move {
                let prompt = format!("Count from {index} to {}.", index + 3);
                match generate(&mut client, greedy(&prompt, 6)).await {
                    Ok(generated) => {
                        assert!(generated.summary.meta.is_some());
                        Code::Ok
                    }
                    Err(status) => status.code(),
                }
            }),
    )
    .await
}

async fn assert_idle(server: &TestServer) {
    let (in_flight, queued, _) = admission(&mut server.client().await).await;
    assert_eq!((in_flight, queued), (0, 0));
}

/// Tasks alive in this test's runtime, where the server runs too.
fn alive_tasks() -> usize {
    tokio::runtime::Handle::current()
        .metrics()
        .num_alive_tasks()
}

/// Waits until the tasks of a burst (connections, relays, client workers)
/// are gone: no more than `before` remain.
async fn assert_tasks_return_to(before: usize) {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    while alive_tasks() > before {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} tasks alive after the burst, {before} before",
            alive_tasks()
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn below_capacity_all_succeed_and_above_it_only_resource_exhausted() {
    let roomy = TestServer::start(config(&[
        "--backend",
        "embedded",
        "--max-in-flight",
        "4",
        "--max-queue",
        "64",
    ]))
    .await;
    let codes = burst(&roomy).await;
    assert!(codes.iter().all(|code| *code == Code::Ok), "{codes:?}");
    assert_idle(&roomy).await;
    drop(roomy);

    let tight = TestServer::start(config(&[
        "--backend",
        "embedded",
        "--max-in-flight",
        "4",
        "--max-queue",
        "8",
    ]))
    .await;
    let before = alive_tasks();
    let codes = burst(&tight).await;
    let succeeded = codes.iter().filter(|code| **code == Code::Ok).count();
    let refused = codes
        .iter()
        .filter(|code| **code == Code::ResourceExhausted)
        .count();
    assert_eq!(succeeded + refused, CLIENTS, "{codes:?}");
    assert!(
        succeeded >= 12,
        "the running and waiting calls succeed: {codes:?}"
    );
    assert!(refused > 0, "64 at once exceed 4 running + 8 waiting");
    assert_idle(&tight).await;
    assert_tasks_return_to(before).await;
}
