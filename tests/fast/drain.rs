//! Graceful shutdown: readiness goes NOT_SERVING and Watch streams end, new
//! calls are refused with UNAVAILABLE, open calls run to their end within
//! the grace period and end as cancelled after it, and the server stops.

use futures_util::StreamExt;
use rigger_inference::{
    proto::{FinishReason, generate_response::Event},
    server::health::INFERENCE_SERVICE,
};
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;

use super::{serve, streaming};
use crate::support::{
    collect, greedy,
    health::{next_status, watch, watch_until},
    scripted::{End, Reply, ScriptedBackend},
};

#[tokio::test]
async fn open_calls_finish_and_new_ones_are_refused() {
    let backend = ScriptedBackend::new("first");
    backend.next(Reply::text(["Hello", " world"]).held_after(1));
    let mut server = serve(&["--shutdown-grace", "30s"], &[&backend]).await;
    let channel = server.channel().await;
    let mut client = server.client().await;
    let mut ready = watch(&channel, INFERENCE_SERVICE).await;
    watch_until(&mut ready, ServingStatus::Serving).await;
    let open = streaming(&mut client, "open").await;

    server.shut_down();
    assert_eq!(next_status(&mut ready).await, ServingStatus::NotServing);
    assert!(
        ready.next().await.is_none(),
        "Watch ends instead of holding the drain open"
    );
    let refused = client
        .generate(greedy("late", 8))
        .await
        .expect_err("no new calls while draining");
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    assert!(refused.message().contains("shutting down"), "{refused:?}");
    assert_eq!(
        backend.requests().len(),
        1,
        "the late call never reached it"
    );

    backend.release(1);
    let rest = collect(open).await.expect("the open call finishes");
    assert_eq!(rest.text, " world");
    assert_eq!(rest.summary.finish_reason, FinishReason::Stop as i32);
    drop((client, channel));
    server.exited().await.expect("a clean stop");
}

#[tokio::test]
async fn calls_past_the_grace_period_end_as_cancelled() {
    let backend = ScriptedBackend::new("first");
    backend.always(Reply::text(["Once upon"]).then(End::Hang));
    let mut server = serve(&["--shutdown-grace", "300ms"], &[&backend]).await;
    let mut client = server.client().await;
    let mut open = streaming(&mut client, "open").await;

    server.shut_down();
    let mut last = None;
    while let Some(message) = open.next().await {
        last = message.expect("no error").event;
    }
    let Some(Event::Summary(summary)) = last else {
        panic!("a summary even when cut: {last:?}");
    };
    assert_eq!(summary.finish_reason, FinishReason::Cancelled as i32);
    backend.dropped(1).await;
    drop(client);
    server.exited().await.expect("a clean stop");
}
