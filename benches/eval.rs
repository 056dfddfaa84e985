//! Evaluation of EnhanceTask and DecomposeTask over a corpus of realistic
//! tasks (`eval/tasks.json`: one-liners, features with context, vague epics),
//! on each backend that can run here, through the gRPC API as a caller uses
//! it, with the service's default sampling.
//!
//! Prints per backend and RPC: answers given, schema-valid rate of the
//! model's outputs, rule violations of first answers and after repair (by
//! rule), repair rate, mean subtasks, p50/p95 latency, tokens per answer and
//! attempts and tokens per call; writes the same as JSON (`--report`),
//! keeping the rows of backends not evaluated in this run. Every call's
//! answer or failure goes to `--answers` (one file per backend and RPC), where
//! `scripts/eval_meaning.py` judges what the answers say.
//!
//! Run: `make eval` (or `cargo bench --bench eval -- --help` with build.env
//! sourced for the options).

#[path = "../tests/support/mod.rs"]
mod support;

use std::{
    collections::BTreeMap,
    path::PathBuf,
    time::{Duration, Instant},
};

use clap::Parser;
use rigger_inference::proto::{
    DecomposeTaskRequest, EnhanceTaskRequest, Enhancement, EnhancementKind, ResponseMeta, Subtask,
    Task, TaskContext, Violation, inference_service_client::InferenceServiceClient,
};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use support::{TestServer, config, openai_config, repo_path};
use tonic::{Code, Status, transport::Channel};

#[derive(Parser)]
struct Args {
    /// Backends to evaluate: `embedded` (in-process llama.cpp) and `openai`
    /// (a llama.cpp server started for the run), both on the default model.
    #[arg(long, value_delimiter = ',', default_values = ["embedded", "openai"])]
    backends: Vec<String>,
    #[arg(long, default_value_os_t = repo_path("eval/tasks.json"))]
    corpus: PathBuf,
    #[arg(long, default_value_os_t = repo_path("eval/report.json"))]
    report: PathBuf,
    /// Folder for every call's answer or failure, one file per backend and
    /// RPC (`<backend>-<rpc>.json`), read by `scripts/eval_meaning.py`.
    #[arg(long, default_value_os_t = repo_path("eval/answers"))]
    answers: PathBuf,
    /// Evaluate only the first N tasks.
    #[arg(long)]
    limit: Option<usize>,
    /// Only this RPC: `decompose` or `enhance`.
    #[arg(long)]
    only: Option<String>,
    /// Print each answer's outcome, and the service's log (filtered by
    /// RUST_LOG; `rigger_inference::task=debug` shows rejected answers).
    #[arg(long)]
    verbose: bool,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

#[derive(Deserialize)]
struct CorpusTask {
    id: String,
    size: String,
    title: String,
    description: Option<String>,
    complexity: Option<u32>,
    project: Option<String>,
    prd: Option<String>,
    #[serde(default)]
    context_files: Vec<String>,
    #[serde(default)]
    dependencies: Vec<String>,
    /// Where a real-world task was taken from (an issue's address).
    source: Option<String>,
}

impl CorpusTask {
    fn task(&self) -> Task {
        Task {
            id: self.id.clone(),
            title: self.title.clone(),
            description: self.description.clone(),
            complexity: self.complexity,
            context_files: self.context_files.clone(),
            dependencies: self.dependencies.clone(),
            ..Default::default()
        }
    }

    fn context(&self) -> Option<TaskContext> {
        (self.project.is_some() || self.prd.is_some()).then(|| TaskContext {
            project: self.project.clone().unwrap_or_default(),
            prd_excerpt: self.prd.clone().unwrap_or_default(),
        })
    }
}

/// One call's outcome.
struct Outcome {
    latency: Duration,
    /// Rules broken by rejected attempts, then by the last one if it failed.
    broken: Vec<String>,
    attempts: u32,
    failure: Option<String>,
    /// Tokens generated over every attempt; unknown for a failed call (its
    /// status carries no counts).
    completion_tokens: Option<u32>,
    subtasks: Option<usize>,
    /// What the call returned, as written to the answers file: the answer's
    /// fields and its meta, or the failure.
    record: Value,
}

impl Outcome {
    fn answered(
        latency: Duration,
        meta: Option<ResponseMeta>,
        subtasks: Option<usize>,
        answer: Value,
    ) -> Self {
        let meta = meta.unwrap_or_default();
        let violations = |violations: &[Violation]| -> Vec<Value> {
            violations
                .iter()
                .map(|violation| json!({ "rule": violation.rule, "detail": violation.detail }))
                .collect()
        };
        let record = json!({
            "answer": answer,
            "meta": {
                "attempts": meta.attempts,
                "repaired": violations(&meta.repaired),
                "dropped": violations(&meta.dropped),
                "completion_tokens": meta.completion_tokens,
                "prompt_tokens": meta.prompt_tokens,
                "cached": meta.cached,
                "latency_ms": latency.as_secs_f64() * 1000.0,
            },
        });
        Self {
            latency,
            broken: meta.repaired.into_iter().map(|v| v.rule).collect(),
            attempts: meta.attempts,
            failure: None,
            completion_tokens: Some(meta.completion_tokens),
            subtasks,
            record,
        }
    }

    fn failed(latency: Duration, status: &Status, attempts: u32) -> Self {
        let rule = status
            .metadata()
            .get("rigger-violation")
            .and_then(|value| value.to_str().ok())
            .map(str::to_owned);
        let failure = match (&rule, status.code()) {
            (Some(rule), Code::Internal) => rule.clone(),
            _ => format!("{:?}: {}", status.code(), status.message()),
        };
        let record = json!({
            "failure": {
                "code": format!("{:?}", status.code()),
                "message": status.message(),
                "rule": rule,
            },
            "meta": {
                "attempts": attempts,
                "latency_ms": latency.as_secs_f64() * 1000.0,
            },
        });
        Self {
            latency,
            broken: rule.into_iter().collect(),
            attempts,
            failure: Some(failure),
            completion_tokens: None,
            subtasks: None,
            record,
        }
    }
}

fn subtask_fields(subtask: &Subtask) -> Value {
    json!({
        "title": subtask.title,
        "description": subtask.description,
        "complexity": subtask.complexity,
        "depends_on": subtask.depends_on,
        "reasoning": subtask.reasoning,
    })
}

fn enhancement_fields(enhancement: &Enhancement) -> Value {
    json!({
        "kind": kind_name(enhancement.kind),
        "title": enhancement.title,
        "description": enhancement.description,
        "acceptance_criteria": enhancement.acceptance_criteria,
    })
}

fn kind_name(kind: i32) -> &'static str {
    EnhancementKind::try_from(kind).map_or("UNKNOWN", |kind| kind.as_str_name())
}

#[derive(Serialize)]
struct Summary {
    backend: String,
    rpc: &'static str,
    answers: usize,
    answered: usize,
    /// Share of model outputs (every attempt) that were valid JSON under the schema.
    schema_valid_rate: f64,
    /// Share of calls whose first answer broke a rule, by rule. A call
    /// that failed tells only its last attempt's rule (the trailer), so it
    /// is counted under that one.
    first_answer_violations: BTreeMap<String, f64>,
    first_answer_violation_rate: f64,
    /// Share of calls answered after at least one repair.
    repair_rate: f64,
    /// Share of calls that failed with a rule still broken, by rule.
    violations_after_repair: BTreeMap<String, f64>,
    violation_rate_after_repair: f64,
    /// Calls that failed for another reason than a broken rule.
    other_failures: Vec<String>,
    mean_subtasks: Option<f64>,
    latency_p50_ms: f64,
    latency_p95_ms: f64,
    /// Tokens generated per answered call, over all its attempts.
    mean_completion_tokens: f64,
    /// Attempts per call, answered or not (a failed call made every
    /// attempt the service allows).
    mean_attempts: f64,
    /// Tokens generated per call over the calls that report them: a failed
    /// call's status carries no counts, so this equals the per-answer mean
    /// unless calls failed.
    mean_completion_tokens_per_call: f64,
}

fn percentile(values: &[f64], share: f64) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let index = ((sorted.len() as f64 - 1.0) * share).round() as usize;
    sorted.get(index).copied().unwrap_or(f64::NAN)
}

fn summarize(backend: &str, rpc: &'static str, outcomes: &[Outcome]) -> Summary {
    let calls = outcomes.len() as f64;
    let share = |count: usize| count as f64 / calls;
    let attempts: u32 = outcomes.iter().map(|o| o.attempts.max(1)).sum();
    let schema_broken = outcomes
        .iter()
        .flat_map(|o| &o.broken)
        .filter(|rule| *rule == "schema" || *rule == "truncated")
        .count();
    let mut first = BTreeMap::new();
    let mut after = BTreeMap::new();
    for outcome in outcomes {
        if let Some(rule) = outcome.broken.first() {
            *first.entry(rule.clone()).or_insert(0) += 1;
        }
        if outcome.failure.is_some()
            && let Some(rule) = outcome.broken.last()
        {
            *after.entry(rule.clone()).or_insert(0) += 1;
        }
    }
    let answered: Vec<&Outcome> = outcomes.iter().filter(|o| o.failure.is_none()).collect();
    let latencies: Vec<f64> = outcomes
        .iter()
        .map(|o| o.latency.as_secs_f64() * 1000.0)
        .collect();
    let subtasks: Vec<usize> = answered.iter().filter_map(|o| o.subtasks).collect();
    Summary {
        backend: backend.to_owned(),
        rpc,
        answers: outcomes.len(),
        answered: answered.len(),
        schema_valid_rate: 1.0 - schema_broken as f64 / f64::from(attempts.max(1)),
        first_answer_violation_rate: share(
            outcomes.iter().filter(|o| !o.broken.is_empty()).count(),
        ),
        first_answer_violations: first.into_iter().map(|(k, v)| (k, share(v))).collect(),
        repair_rate: share(answered.iter().filter(|o| o.attempts > 1).count()),
        violation_rate_after_repair: share(after.values().sum()),
        violations_after_repair: after.into_iter().map(|(k, v)| (k, share(v))).collect(),
        other_failures: outcomes
            .iter()
            .filter_map(|o| o.failure.clone())
            .filter(|failure| failure.contains(": "))
            .collect(),
        mean_subtasks: (!subtasks.is_empty())
            .then(|| subtasks.iter().sum::<usize>() as f64 / subtasks.len() as f64),
        latency_p50_ms: percentile(&latencies, 0.5),
        latency_p95_ms: percentile(&latencies, 0.95),
        mean_completion_tokens: mean(answered.iter().filter_map(|o| o.completion_tokens)),
        mean_attempts: mean(outcomes.iter().map(|o| o.attempts.max(1))),
        mean_completion_tokens_per_call: mean(outcomes.iter().filter_map(|o| o.completion_tokens)),
    }
}

fn mean(values: impl Iterator<Item = u32>) -> f64 {
    let (sum, count) = values.fold((0.0, 0usize), |(sum, count), value| {
        (sum + f64::from(value), count + 1)
    });
    sum / count.max(1) as f64
}

/// Every kind the contract defines (numbered from 0 without gaps),
/// `UNSPECIFIED` (the service's choice) first: a kind added to the proto is
/// evaluated too.
fn kinds() -> Vec<EnhancementKind> {
    (0..)
        .map_while(|value| EnhancementKind::try_from(value).ok())
        .collect()
}

async fn decompose(
    client: &mut InferenceServiceClient<Channel>,
    item: &CorpusTask,
    attempts: u32,
) -> Outcome {
    let started = Instant::now();
    let result = client
        .decompose_task(DecomposeTaskRequest {
            task: Some(item.task()),
            context: item.context(),
            ..Default::default()
        })
        .await;
    match result {
        Ok(response) => {
            let response = response.into_inner();
            let answer = json!({
                "subtasks": response.subtasks.iter().map(subtask_fields).collect::<Vec<_>>(),
            });
            Outcome::answered(
                started.elapsed(),
                response.meta,
                Some(response.subtasks.len()),
                answer,
            )
        }
        Err(status) => Outcome::failed(started.elapsed(), &status, attempts),
    }
}

async fn enhance(
    client: &mut InferenceServiceClient<Channel>,
    item: &CorpusTask,
    kind: EnhancementKind,
    attempts: u32,
) -> Outcome {
    let started = Instant::now();
    let result = client
        .enhance_task(EnhanceTaskRequest {
            task: Some(item.task()),
            context: item.context(),
            kind: kind as i32,
            ..Default::default()
        })
        .await;
    match result {
        Ok(response) => {
            let response = response.into_inner();
            let answer = response
                .enhancement
                .as_ref()
                .map_or(Value::Null, enhancement_fields);
            Outcome::answered(started.elapsed(), response.meta, None, answer)
        }
        Err(status) => Outcome::failed(started.elapsed(), &status, attempts),
    }
}

fn print_summary(summary: &Summary) {
    let rates = |rates: &BTreeMap<String, f64>| {
        rates
            .iter()
            .map(|(rule, rate)| format!("{rule} {:.0}%", rate * 100.0))
            .collect::<Vec<_>>()
            .join(", ")
    };
    println!(
        "| {} | {} | {}/{} | {:.0}% | {:.0}% ({}) | {:.0}% | {:.1}% ({}) | {} | {:.0} / {:.0} | {:.0} | {:.2} / {:.0} |",
        summary.backend,
        summary.rpc,
        summary.answered,
        summary.answers,
        summary.schema_valid_rate * 100.0,
        summary.first_answer_violation_rate * 100.0,
        rates(&summary.first_answer_violations),
        summary.repair_rate * 100.0,
        summary.violation_rate_after_repair * 100.0,
        rates(&summary.violations_after_repair),
        summary
            .mean_subtasks
            .map_or_else(|| "–".to_owned(), |mean| format!("{mean:.1}")),
        summary.latency_p50_ms,
        summary.latency_p95_ms,
        summary.mean_completion_tokens,
        summary.mean_attempts,
        summary.mean_completion_tokens_per_call,
    );
    for failure in &summary.other_failures {
        println!("  other failure: {failure}");
    }
}

/// Writes every call's record, with the task it answered, to
/// `<dir>/<backend>-<rpc>.json`.
fn write_answers(
    dir: &std::path::Path,
    backend: &str,
    rpc: &str,
    corpus: &[CorpusTask],
    outcomes: &[Outcome],
) {
    let calls: Vec<Value> = corpus
        .iter()
        .zip(outcomes)
        .map(|(item, outcome)| {
            let mut record = json!({ "task": item.id, "size": item.size, "source": item.source });
            if let (Some(record), Some(outcome)) =
                (record.as_object_mut(), outcome.record.as_object())
            {
                record.extend(outcome.clone());
            }
            record
        })
        .collect();
    let file = json!({ "backend": backend, "rpc": rpc, "tasks": corpus.len(), "calls": calls });
    std::fs::create_dir_all(dir).expect("create the answers folder");
    let path = dir.join(format!("{backend}-{rpc}.json"));
    std::fs::write(
        &path,
        serde_json::to_string_pretty(&file).expect("serializable") + "\n",
    )
    .expect("write the answers");
    println!("answers: {}", path.display());
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    if args.verbose {
        rigger_inference::server::init_tracing(rigger_inference::config::LogFormat::Text);
    }
    let corpus: Vec<CorpusTask> =
        serde_json::from_slice(&std::fs::read(&args.corpus).expect("read the corpus"))
            .expect("a JSON list of tasks");
    let corpus = &corpus[..args.limit.unwrap_or(corpus.len()).min(corpus.len())];
    let sizes = corpus.iter().fold(BTreeMap::new(), |mut sizes, item| {
        *sizes.entry(item.size.as_str()).or_insert(0) += 1;
        sizes
    });
    println!("corpus: {} tasks {sizes:?}", corpus.len());
    let attempts = config(&[]).task_attempts;
    let mut summaries = Vec::new();
    for backend in &args.backends {
        let server = match backend.as_str() {
            "embedded" => TestServer::start(config(&["--backend", "embedded"])).await,
            "openai" => TestServer::start(openai_config()).await,
            other => panic!("unknown backend {other:?}: embedded or openai"),
        };
        let mut client = server.client().await;
        let rpcs: &[&'static str] = match args.only.as_deref() {
            Some("decompose") => &["decompose"],
            Some("enhance") => &["enhance"],
            _ => &["decompose", "enhance"],
        };
        for &rpc in rpcs {
            let mut outcomes = Vec::with_capacity(corpus.len());
            for (index, item) in corpus.iter().enumerate() {
                let outcome = match rpc {
                    "decompose" => decompose(&mut client, item, attempts).await,
                    _ => {
                        let kinds = kinds();
                        let kind = kinds[index % kinds.len()];
                        let mut outcome = enhance(&mut client, item, kind, attempts).await;
                        outcome.record["kind_requested"] = kind.as_str_name().into();
                        outcome
                    }
                };
                if args.verbose {
                    println!(
                        "{backend} {rpc} {}: attempts {} broken {:?} failure {:?} in {:?}",
                        item.id, outcome.attempts, outcome.broken, outcome.failure, outcome.latency
                    );
                }
                outcomes.push(outcome);
            }
            write_answers(&args.answers, backend, rpc, corpus, &outcomes);
            summaries.push(summarize(backend, rpc, &outcomes));
        }
        let _ = server.stop().await;
    }
    println!();
    println!(
        "| backend | RPC | answered | schema-valid outputs | first answers breaking a rule | repaired | rule broken after repair | mean subtasks | latency p50 / p95 ms | tokens per answer | attempts / tokens per call |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    for summary in &summaries {
        print_summary(summary);
    }
    // Rows of backends not evaluated in this run are kept from the last
    // report, so one backend can be evaluated again on its own.
    let mut results: Vec<serde_json::Value> = std::fs::read(&args.report)
        .ok()
        .and_then(|bytes| serde_json::from_slice::<serde_json::Value>(&bytes).ok())
        .and_then(|report| report["results"].as_array().cloned())
        .unwrap_or_default()
        .into_iter()
        .filter(|row| {
            row["tasks"] == corpus.len()
                && !args
                    .backends
                    .iter()
                    .any(|backend| row["backend"] == backend.as_str())
        })
        .collect();
    results.extend(summaries.iter().map(|summary| {
        let mut row = serde_json::to_value(summary).expect("serializable");
        row["tasks"] = corpus.len().into();
        row
    }));
    let report = serde_json::json!({
        "corpus": args.corpus.file_name().map(|name| name.to_string_lossy().into_owned()),
        "results": results,
    });
    std::fs::write(
        &args.report,
        serde_json::to_string_pretty(&report).expect("serializable") + "\n",
    )
    .expect("write the report");
    println!("\nreport: {}", args.report.display());
}
