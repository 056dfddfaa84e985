//! Admission on the real embedded engine: beyond the running and waiting
//! calls a call is refused at once with RESOURCE_EXHAUSTED and a retry hint;
//! slots come back when calls end or leave; GetStatus shows it all.

mod support;

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use rigger_inference::server::{PRIORITY_HEADER, RETRY_AFTER};
use support::{TestServer, admission, collect, config, generate, greedy};
use tonic::{Code, Request};

#[tokio::test]
async fn past_the_queue_calls_are_refused_at_once_and_slots_come_back() {
    let server = TestServer::start(config(&[
        "--backend",
        "embedded",
        "--max-in-flight",
        "1",
        "--max-queue",
        "1",
    ]))
    .await;
    let mut client = server.client().await;
    let long = || greedy("Tell a long story about a lighthouse keeper.", 400);

    let mut running = client.generate(long()).await.unwrap().into_inner();
    running.next().await.expect("text").expect("no error");
    let mut waiting_client = client.clone();
    let mut batch = Request::new(long());
    batch
        .metadata_mut()
        .insert(PRIORITY_HEADER, "batch".parse().unwrap());
    let waiting = tokio::spawn(async move { waiting_client.generate(batch).await });
    let deadline = Instant::now() + Duration::from_secs(10);
    while admission(&mut client).await.1 == 0 {
        assert!(Instant::now() < deadline, "the second call waits");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    let asked = Instant::now();
    let refused = client.generate(long()).await.expect_err("no room left");
    let answered_in = asked.elapsed();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    let retry_after: u64 = refused
        .metadata()
        .get(RETRY_AFTER)
        .expect("a retry hint")
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(retry_after >= 1);
    assert!(
        answered_in < Duration::from_millis(100),
        "refused at once, took {answered_in:?}"
    );
    eprintln!("RESOURCE_EXHAUSTED answered in {answered_in:?} through gRPC (debug build)");
    assert_eq!(admission(&mut client).await, (1, 1, 1));

    // The running call's client leaves: its slot goes to the waiting one,
    // which runs to its end; then every slot is free.
    drop(running);
    let admitted = waiting.await.unwrap().expect("admitted").into_inner();
    collect(admitted)
        .await
        .expect("the waiting call runs to its end");
    let deadline = Instant::now() + Duration::from_secs(10);
    while admission(&mut client).await.0 != 0 {
        assert!(Instant::now() < deadline, "slots come back");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut bad = Request::new(greedy("Hi", 4));
    bad.metadata_mut()
        .insert(PRIORITY_HEADER, "urgent".parse().unwrap());
    let status = client.generate(bad).await.expect_err("unknown priority");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains(PRIORITY_HEADER));
    let quick = generate(&mut client, greedy("Hi", 4)).await;
    assert!(quick.is_ok(), "admitted again: {quick:?}");
}
