//! Many instances with real runtimes: three llama.cpp servers (one thread,
//! four slots each, on loopback) behind one gateway. Prefix routing sends
//! each turn of a conversation back to the server that holds the
//! conversation in its prompt cache, so more prompt tokens come from cache
//! than under round-robin, which spreads the turns over every server.
//!
//! Also: Ollama instances (two stand-ins over the shared llama.cpp server)
//! from a list, with sessions kept on one instance, one stand-in stopped
//! (ejected, the calls go on) and started again on its port (back); and
//! instances found through DNS (`localhost`, one instance per address).

mod support;

use std::sync::atomic::Ordering;

use rigger_inference::proto::{
    ChatMessage, GenerateRequest, GetStatusRequest, InstanceStatus, Role,
    inference_service_client::InferenceServiceClient,
};
use support::{
    LlamaServer, TestServer, collect, config, generate, greedy, llama, ollama::OllamaStandIn,
};
use tonic::{Request, transport::Channel};

type Client = InferenceServiceClient<Channel>;

const CONVERSATIONS: usize = 4;
const TURNS: usize = 3;

/// Prompt tokens served from cache over a multi-turn workload (the turns of
/// every conversation interleaved), through a gateway over `servers` with
/// `routing`; each run has a system prompt of its own, so no run finds
/// another's prompts cached.
async fn cached_tokens(servers: &[LlamaServer], routing: &str) -> (u32, u32) {
    let urls: Vec<String> = servers.iter().map(LlamaServer::openai_url).collect();
    let gateway = TestServer::start(config(&[
        "--backend",
        "openai",
        "--openai-base-url",
        &urls.join(","),
        "--routing",
        routing,
    ]))
    .await;
    let mut client = gateway.client().await;
    let system = format!(
        "Run {routing}. You plan work for a team that builds a web shop in Rust. \
         Answer in one short sentence, naming the first concrete step. "
    )
    .repeat(3);
    let mut histories: Vec<Vec<ChatMessage>> = (0..CONVERSATIONS)
        .map(|_| vec![message(Role::System, &system)])
        .collect();
    let (mut cached, mut prompt) = (0, 0);
    for turn in 0..TURNS {
        for (conversation, history) in histories.iter_mut().enumerate() {
            history.push(message(
                Role::User,
                &format!(
                    "Task {conversation}, question {turn}: {} What comes next?",
                    format!("Feature {conversation} touches checkout, stock and e-mail. ")
                        .repeat(3)
                ),
            ));
            let request = GenerateRequest {
                prompt: String::new(),
                messages: history.clone(),
                ..greedy("", 8)
            };
            let answer = generate(&mut client, request).await.expect("an answer");
            let meta = answer.summary.meta.expect("meta");
            cached += meta.cached_prompt_tokens;
            prompt += meta.prompt_tokens;
            history.push(message(Role::Assistant, &answer.text));
        }
    }
    let status = client
        .get_status(GetStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    let instances = &status.backends[0].instances;
    assert_eq!(instances.len(), servers.len(), "{instances:?}");
    assert!(instances.iter().all(|instance| instance.serving));
    let calls: u64 = instances.iter().map(|instance| instance.calls).sum();
    assert_eq!(calls, (CONVERSATIONS * TURNS) as u64);
    (cached, prompt)
}

fn message(role: Role, content: &str) -> ChatMessage {
    ChatMessage {
        role: role.into(),
        content: content.to_owned(),
    }
}

#[tokio::test]
async fn prefix_routing_serves_more_prompt_tokens_from_cache_than_round_robin() {
    let servers: Vec<LlamaServer> = (0..3).map(|_| LlamaServer::start_with("1", "4")).collect();
    let (prefix, prefix_total) = cached_tokens(&servers, "prefix").await;
    let (round_robin, round_robin_total) = cached_tokens(&servers, "round-robin").await;
    eprintln!(
        "cached prompt tokens: prefix {prefix}/{prefix_total}, round-robin {round_robin}/{round_robin_total}"
    );
    assert!(
        prefix > round_robin,
        "prefix {prefix} of {prefix_total} vs round-robin {round_robin} of {round_robin_total}"
    );
}

async fn instances(client: &mut Client) -> Vec<InstanceStatus> {
    let status = client
        .get_status(GetStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    status.backends[0].instances.clone()
}

/// Polls GetStatus until `condition` holds for the instances (within 10 s).
async fn until_instances(
    client: &mut Client,
    what: &str,
    condition: impl Fn(&[InstanceStatus]) -> bool,
) {
    for _ in 0..200 {
        if condition(&instances(client).await) {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("{what}: {:?}", instances(client).await);
}

async fn in_session(client: &mut Client, session: &str) {
    let mut request = Request::new(greedy("Say hi.", 4));
    request
        .metadata_mut()
        .insert("rigger-session", session.parse().unwrap());
    let stream = client.generate(request).await.expect("starts").into_inner();
    collect(stream).await.expect("an answer");
}

#[tokio::test]
async fn ollama_instances_from_a_list_keep_sessions_and_survive_one_going_away() {
    let a = OllamaStandIn::start(&llama().openai_url()).await;
    let b = OllamaStandIn::start(&llama().openai_url()).await;
    let gateway = TestServer::start(config(&[
        "--backend",
        "ollama",
        "--ollama-host",
        &format!("{},{}", a.host(), b.host()),
        "--routing",
        "session",
    ]))
    .await;
    let mut client = gateway.client().await;
    // The gateway is ready once one instance serves; sessions placed before
    // the second one joins would all land on the first.
    until_instances(&mut client, "both instances serve", |listed| {
        listed.iter().filter(|instance| instance.serving).count() == 2
    })
    .await;
    let completed = |stand_in: &OllamaStandIn| stand_in.controls.completed.load(Ordering::SeqCst);
    let mut placed = Vec::new();
    // Twelve sessions: rendezvous hashing puts all of them on one of two
    // instances with a chance of 2 in 4096.
    for session in 1..=12 {
        let run = format!("run-{session}");
        let run = run.as_str();
        let before = (completed(&a), completed(&b));
        for _ in 0..2 {
            in_session(&mut client, run).await;
        }
        let after = (completed(&a), completed(&b));
        let on = match (after.0 - before.0, after.1 - before.1) {
            (2, 0) => 'a',
            (0, 2) => 'b',
            split => panic!("{run} split over instances: {split:?}"),
        };
        placed.push(on);
    }
    assert!(placed.contains(&'a') && placed.contains(&'b'), "{placed:?}");

    // One instance goes away: it is ejected and every call goes on.
    let a_address = a.addr;
    let a_controls = a.controls.clone();
    a.stop().await;
    until_instances(&mut client, "the stopped instance is ejected", |listed| {
        listed.iter().filter(|instance| instance.serving).count() == 1
    })
    .await;
    for run in ["run-1", "run-2", "run-3", "run-4"] {
        in_session(&mut client, run).await;
    }
    let back = OllamaStandIn::start_on(a_address, &llama().openai_url()).await;
    until_instances(&mut client, "the restarted instance is back", |listed| {
        listed.iter().all(|instance| instance.serving)
    })
    .await;
    // The same twelve sessions, some of which were placed on it above.
    for session in 1..=12 {
        in_session(&mut client, &format!("run-{session}")).await;
    }
    assert!(
        completed(&back) > 0,
        "its sessions return to it ({} before it stopped)",
        a_controls.completed.load(Ordering::SeqCst)
    );
}

#[tokio::test]
async fn a_host_name_is_one_instance_per_address_it_resolves_to() {
    let server = llama();
    let gateway = TestServer::start(config(&[
        "--backend",
        "openai",
        "--openai-base-url",
        &format!("http://localhost:{}/v1", server.port),
    ]))
    .await;
    let mut client = gateway.client().await;
    let resolved: Vec<std::net::IpAddr> = tokio::net::lookup_host(("localhost", server.port))
        .await
        .unwrap()
        .map(|address| address.ip())
        .collect();
    let listed = instances(&mut client).await;
    assert_eq!(listed.len(), resolved.len(), "{listed:?} for {resolved:?}");
    // The server listens on 127.0.0.1 only: that address serves, any other
    // (::1) is not serving, and calls go to the one that serves.
    let v4 = format!("http://127.0.0.1:{}/v1", server.port);
    for instance in &listed {
        assert_eq!(instance.serving, instance.endpoint == v4, "{instance:?}");
    }
    for _ in 0..3 {
        generate(&mut client, greedy("Say hi.", 4))
            .await
            .expect("an answer");
    }
    let listed = instances(&mut client).await;
    let calls: u64 = listed
        .iter()
        .filter(|instance| instance.endpoint == v4)
        .map(|instance| instance.calls)
        .sum();
    assert_eq!(calls, 3);
}
