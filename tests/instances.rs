//! Many instances with real runtimes: three llama.cpp servers (one thread,
//! four slots each, on loopback) behind one gateway. Prefix routing sends
//! each turn of a conversation back to the server that holds the
//! conversation in its prompt cache, so more prompt tokens come from cache
//! than under round-robin, which spreads the turns over every server.

mod support;

use rigger_inference::proto::{ChatMessage, GenerateRequest, GetStatusRequest, Role};
use support::{LlamaServer, TestServer, config, generate, greedy};

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
