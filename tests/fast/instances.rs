//! Many instances of one runtime kind behind one backend: each routing
//! policy's choices, the load cap on prefix routing, an instance ejected by
//! its probes and back, one that vanishes from discovery draining its
//! calls, model eligibility, and failover between instances before the next
//! backend kind. Instances are scripted backends found by a scripted
//! discovery.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use async_trait::async_trait;
use rigger_inference::{
    backend::{
        Backend, BreakerPolicy, Capabilities, SchemaSupport,
        instances::{
            InstancePool, PoolSettings,
            discovery::Discover,
            prefix::PrefixSettings,
            routing::{PrefixRule, Routing},
        },
    },
    proto::{
        BackendHealth, ChatMessage, CircuitState, GenerateRequest, GenerateResponse,
        InstanceStatus, Role,
    },
};
use tonic::{Code, Request, Status, Streaming};

use super::{Client, backend_status, until};
use crate::support::{
    self, Generated, TestServer, collect, generate,
    scripted::{ErrorKind, Reply, ScriptedBackend},
};

/// Endpoints a test can change while the pool runs.
#[derive(Clone, Default)]
struct Found(Arc<Mutex<Vec<String>>>);

impl Found {
    fn set(&self, endpoints: &[&str]) {
        *self.0.lock().unwrap() = endpoints.iter().map(|e| (*e).to_owned()).collect();
    }
}

#[async_trait]
impl Discover for Found {
    async fn endpoints(&self) -> Result<Vec<String>, String> {
        Ok(self.0.lock().unwrap().clone())
    }
}

const CAPABILITIES: Capabilities = Capabilities {
    no_repeat: false,
    text_patterns: false,
    json_schema: SchemaSupport::Enforced,
    seed: true,
};

const ENDPOINTS: [&str; 3] = [
    "http://10.0.0.1:11434",
    "http://10.0.0.2:11434",
    "http://10.0.0.3:11434",
];

/// Three scripted `ollama` instances (the first two serving `model-a` and
/// `model-b`, the third `model-c` too), pooled under `routing`, and the
/// service over the pool alone.
struct Pool {
    instances: Vec<Arc<ScriptedBackend>>,
    found: Found,
    server: TestServer,
}

impl Pool {
    async fn start(routing: Routing) -> Self {
        let instances: Vec<Arc<ScriptedBackend>> = [
            &["model-a", "model-b"][..],
            &["model-a", "model-b"],
            &["model-a", "model-b", "model-c"],
        ]
        .iter()
        .map(|models| ScriptedBackend::with("ollama", CAPABILITIES, models))
        .collect();
        let by_endpoint: HashMap<String, Arc<ScriptedBackend>> = ENDPOINTS
            .iter()
            .map(|endpoint| (*endpoint).to_owned())
            .zip(instances.iter().cloned())
            .collect();
        let found = Found::default();
        found.set(&ENDPOINTS);
        let pool = InstancePool::new(
            "ollama",
            "pool.test".to_owned(),
            CAPABILITIES,
            Box::new(found.clone()),
            Box::new(move |endpoint: &str| -> Arc<dyn Backend> { by_endpoint[endpoint].clone() }),
            PoolSettings {
                routing,
                prefix: PrefixSettings {
                    block_bytes: 16,
                    capacity: 4096,
                    ttl: Duration::from_secs(600),
                },
                breaker: BreakerPolicy {
                    failures: 1,
                    cooldown: Duration::from_secs(600),
                },
                discovery_interval: Duration::from_millis(50),
                probe_timeout: Duration::from_secs(1),
            },
        );
        let mut config = support::config(&[]);
        config.probe_interval = Duration::from_millis(50);
        let server = TestServer::with_backends(config, vec![Arc::new(pool)]).await;
        Self {
            instances,
            found,
            server,
        }
    }

    /// Requests each instance got.
    fn calls(&self) -> Vec<usize> {
        self.instances
            .iter()
            .map(|instance| instance.requests().len())
            .collect()
    }

    async fn instances(&self, client: &mut Client) -> Vec<InstanceStatus> {
        backend_status(client, "ollama").await.instances
    }
}

fn chat(turns: &[&str]) -> GenerateRequest {
    let mut request = support::greedy("", 4);
    request.messages = turns
        .iter()
        .enumerate()
        .map(|(at, text)| ChatMessage {
            role: if at % 2 == 0 {
                Role::User
            } else {
                Role::Assistant
            }
            .into(),
            content: (*text).to_owned(),
        })
        .collect();
    request
}

/// A call started and its first message read; the rest stays open.
async fn open(
    client: &mut Client,
    request: impl tonic::IntoRequest<GenerateRequest>,
) -> Streaming<GenerateResponse> {
    let mut stream = client.generate(request).await.expect("starts").into_inner();
    futures_util::StreamExt::next(&mut stream)
        .await
        .expect("a first message")
        .expect("no error");
    stream
}

async fn in_session(client: &mut Client, session: &str) -> Result<Generated, Status> {
    let mut request = Request::new(support::greedy("Hi", 4));
    request
        .metadata_mut()
        .insert("rigger-session", session.parse().unwrap());
    collect(client.generate(request).await?.into_inner()).await
}

/// Ejects `instances` (their probes fail) until `done` ends, then lets them
/// back and waits for their return.
async fn while_only_others_serve<F: std::future::Future>(
    pool: &Pool,
    client: &Client,
    ejected: &[usize],
    done: F,
) -> F::Output {
    for index in ejected {
        pool.instances[*index].probes_fail(Some(ErrorKind::Unavailable));
    }
    until("the instances are ejected", || {
        let mut client = client.clone();
        async move {
            let listed = pool.instances(&mut client).await;
            ejected.iter().all(|index| !listed[*index].serving)
        }
    })
    .await;
    let output = done.await;
    for index in ejected {
        pool.instances[*index].probes_fail(None);
    }
    until("the instances return", || {
        let mut client = client.clone();
        async move {
            let listed = pool.instances(&mut client).await;
            listed.iter().all(|instance| instance.serving)
        }
    })
    .await;
    output
}

#[tokio::test]
async fn round_robin_takes_each_instance_in_turn() {
    let pool = Pool::start(Routing::RoundRobin).await;
    let mut client = pool.server.client().await;
    for _ in 0..6 {
        generate(&mut client, support::greedy("Hi", 4))
            .await
            .unwrap();
    }
    assert_eq!(pool.calls(), [2, 2, 2]);
    let listed = pool.instances(&mut client).await;
    let endpoints: Vec<&str> = listed.iter().map(|i| i.endpoint.as_str()).collect();
    assert_eq!(endpoints, ENDPOINTS);
    assert!(
        listed
            .iter()
            .all(|i| i.serving && !i.draining && i.calls == 2)
    );
}

#[tokio::test]
async fn least_loaded_avoids_an_instance_with_calls_in_flight() {
    let pool = Pool::start(Routing::LeastLoaded).await;
    let mut client = pool.server.client().await;
    // Two streams held open on the first instance: the others are out while
    // they start.
    pool.instances[0].always(Reply::text(["a", "b"]).held_after(1));
    let held = while_only_others_serve(&pool, &client, &[1, 2], async {
        let mut client = client.clone();
        vec![
            open(&mut client, support::greedy("Hold", 4)).await,
            open(&mut client, support::greedy("Hold", 4)).await,
        ]
    })
    .await;
    pool.instances[0].always(Reply::text(["Hello"]));
    let in_flight: Vec<u32> = pool
        .instances(&mut client)
        .await
        .iter()
        .map(|i| i.in_flight)
        .collect();
    assert_eq!(in_flight, [2, 0, 0]);
    let before = pool.calls();
    for _ in 0..30 {
        generate(&mut client, support::greedy("Hi", 4))
            .await
            .unwrap();
    }
    let after = pool.calls();
    // The busy instance is taken only when both draws fall on it (1 in 9):
    // about 3 of 30 calls; 12 or more would happen once in 10^5 runs.
    assert!(after[0] - before[0] < 12, "{before:?} -> {after:?}");
    assert!(after[1] > before[1] && after[2] > before[2], "{after:?}");
    pool.instances[0].release(2);
    drop(held);
}

#[tokio::test]
async fn a_session_stays_on_one_instance() {
    let pool = Pool::start(Routing::Session).await;
    let mut client = pool.server.client().await;
    let mut placed = Vec::new();
    for run in ["run-1", "run-2", "run-3", "run-4", "run-5", "run-6"] {
        let before = pool.calls();
        for _ in 0..3 {
            in_session(&mut client, run).await.unwrap();
        }
        let after = pool.calls();
        let grew: Vec<usize> = (0..3).filter(|i| after[*i] > before[*i]).collect();
        assert_eq!(
            grew.len(),
            1,
            "{run} stayed on one instance: {before:?} -> {after:?}"
        );
        assert_eq!(after[grew[0]] - before[grew[0]], 3);
        placed.push(grew[0]);
    }
    placed.sort_unstable();
    placed.dedup();
    assert!(placed.len() > 1, "sessions spread over instances");
    let refused = in_session(&mut client, &"x".repeat(300)).await.unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument);
    assert!(
        refused.message().contains("rigger-session"),
        "{}",
        refused.message()
    );
}

#[tokio::test]
async fn prefix_routing_returns_a_conversation_to_its_instance_within_the_load_cap() {
    let rule = PrefixRule {
        min_match: 0.3,
        max_load_gap: 1,
    };
    let pool = Pool::start(Routing::Prefix(rule)).await;
    let mut client = pool.server.client().await;
    let system = "You plan software tasks for a web shop written in Rust. ".repeat(4);
    let first = [system.as_str(), "Split: add password reset."];
    generate(&mut client, chat(&first)).await.unwrap();
    let home = pool.calls().iter().position(|n| *n == 1).unwrap();
    for turn in 0..4 {
        let answer = format!("Step {turn} done.");
        let conversation = [first[0], first[1], &answer, "And next?"];
        generate(&mut client, chat(&conversation)).await.unwrap();
    }
    assert_eq!(
        pool.calls()[home],
        5,
        "every turn went home: {:?}",
        pool.calls()
    );
    let listed = pool.instances(&mut client).await;
    assert_eq!(listed[home].prefix_routed, 4);
    assert!(listed[home].prefix_blocks > 0);

    // The home instance now has two calls in flight: over the gap of one,
    // the next turn goes to the least loaded instead.
    pool.instances[home].next(Reply::text(["a", "b"]).held_after(1));
    pool.instances[home].next(Reply::text(["a", "b"]).held_after(1));
    let mut held = Vec::new();
    for _ in 0..2 {
        held.push(open(&mut client, chat(&first)).await);
    }
    let before = pool.calls();
    assert_eq!(before[home], 7, "held calls went home too: {before:?}");
    generate(&mut client, chat(&first)).await.unwrap();
    let after = pool.calls();
    assert_eq!(
        after[home], before[home],
        "the busy home was skipped: {after:?}"
    );
    pool.instances[home].release(2);
    drop(held);
}

#[tokio::test]
async fn an_instance_failing_its_probes_is_ejected_and_returns() {
    let pool = Pool::start(Routing::RoundRobin).await;
    let mut client = pool.server.client().await;
    pool.instances[1].probes_fail(Some(ErrorKind::Unavailable));
    until("the second instance is ejected", || {
        let mut client = client.clone();
        let pool = &pool;
        async move { !pool.instances(&mut client).await[1].serving }
    })
    .await;
    let before = pool.calls();
    for _ in 0..4 {
        generate(&mut client, support::greedy("Hi", 4))
            .await
            .unwrap();
    }
    let after = pool.calls();
    assert_eq!(after[1], before[1], "none went to the ejected instance");
    assert_eq!(
        after.iter().sum::<usize>(),
        before.iter().sum::<usize>() + 4
    );
    let status = backend_status(&mut client, "ollama").await;
    assert_eq!(
        status.health,
        BackendHealth::Serving as i32,
        "serving while any instance is"
    );
    pool.instances[1].probes_fail(None);
    until("the second instance returns", || {
        let mut client = client.clone();
        let pool = &pool;
        async move { pool.instances(&mut client).await[1].serving }
    })
    .await;
    for _ in 0..3 {
        generate(&mut client, support::greedy("Hi", 4))
            .await
            .unwrap();
    }
    assert!(pool.calls()[1] > after[1], "it takes calls again");
}

#[tokio::test]
async fn a_call_refused_by_one_instance_is_answered_by_another() {
    let pool = Pool::start(Routing::RoundRobin).await;
    let mut client = pool.server.client().await;
    pool.instances[0].next(Reply::refuse(ErrorKind::Unavailable));
    generate(&mut client, support::greedy("Hi", 4))
        .await
        .expect("another instance answers");
    assert_eq!(pool.calls()[0], 1, "the first was tried");
    assert_eq!(pool.calls().iter().sum::<usize>(), 2);
    let listed = pool.instances(&mut client).await;
    assert_eq!(
        listed[0].circuit,
        CircuitState::Open as i32,
        "its outage opened its circuit (one failure opens it here)"
    );
}

#[tokio::test]
async fn a_vanished_instance_drains_its_calls_and_takes_no_new_ones() {
    let pool = Pool::start(Routing::RoundRobin).await;
    let mut client = pool.server.client().await;
    pool.instances[0].next(Reply::text(["a", "b"]).held_after(1));
    let held = open(&mut client, support::greedy("Hold", 4)).await;
    pool.found.set(&ENDPOINTS[1..]);
    until("the first instance drains", || {
        let mut client = client.clone();
        let pool = &pool;
        async move {
            let listed = pool.instances(&mut client).await;
            listed.len() == 3 && listed[2].endpoint == ENDPOINTS[0] && listed[2].draining
        }
    })
    .await;
    let before = pool.calls()[0];
    for _ in 0..4 {
        generate(&mut client, support::greedy("Hi", 4))
            .await
            .unwrap();
    }
    assert_eq!(pool.calls()[0], before, "no new calls while draining");
    pool.instances[0].release(1);
    let rest = collect(held).await;
    assert!(rest.is_ok(), "the drained call completes: {rest:?}");
    until("the drained instance is gone", || {
        let mut client = client.clone();
        let pool = &pool;
        async move { pool.instances(&mut client).await.len() == 2 }
    })
    .await;
    pool.found.set(&ENDPOINTS);
    until("it is found again", || {
        let mut client = client.clone();
        let pool = &pool;
        async move { pool.instances(&mut client).await.len() == 3 }
    })
    .await;
}

#[tokio::test]
async fn only_instances_serving_the_model_take_its_calls() {
    let pool = Pool::start(Routing::RoundRobin).await;
    let mut client = pool.server.client().await;
    for _ in 0..3 {
        let mut request = support::greedy("Hi", 4);
        request.model = "model-c".into();
        generate(&mut client, request).await.unwrap();
    }
    assert_eq!(pool.calls(), [0, 0, 3]);
    let mut request = support::greedy("Hi", 4);
    request.model = "model-z".into();
    let unknown = generate(&mut client, request).await.unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound);
}
