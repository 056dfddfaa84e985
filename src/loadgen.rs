//! A gRPC load generator on this crate's own client, reporting in ghz's
//! terms (count, total time, requests per second, latency percentiles,
//! status-code distribution) as text or JSON. It reads ghz's JSON config
//! files (`deploy/ghz/`), so the files users run with ghz are the ones the
//! tests run here (ghz itself is not installable on this machine).

use std::{
    collections::{BTreeMap, HashMap},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use futures_util::{StreamExt, future::join_all};
use prost_reflect::{DescriptorPool, DynamicMessage};
use serde::Deserialize;
use serde_json::{Value, json};
use tonic::{Code, Request, metadata::MetadataValue, transport::Channel};

use crate::proto::{self, inference_service_client::InferenceServiceClient};

/// The fields of a ghz config file this generator reads. `proto`,
/// `import-paths` and `insecure` are accepted and need nothing: the client
/// is compiled from the same contracts and speaks plaintext.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct GhzConfig {
    pub call: String,
    #[serde(default = "default_host")]
    pub host: String,
    pub total: Option<usize>,
    pub concurrency: Option<usize>,
    pub duration: Option<String>,
    pub rps: Option<f64>,
    pub timeout: Option<String>,
    #[serde(default)]
    pub data: Value,
    #[serde(default)]
    pub metadata: HashMap<String, String>,
    #[serde(rename = "skipFirst")]
    pub skip_first: Option<usize>,
    #[serde(default)]
    pub insecure: bool,
    pub proto: Option<String>,
    #[serde(default)]
    pub import_paths: Vec<String>,
}

fn default_host() -> String {
    "127.0.0.1:50051".to_owned()
}

/// ghz's defaults where a config says nothing.
const GHZ_TOTAL: usize = 200;
const GHZ_CONCURRENCY: usize = 50;
const GHZ_TIMEOUT: Duration = Duration::from_secs(20);

/// One request of the service, ready to send repeatedly.
#[derive(Clone, Debug)]
pub enum Call {
    Generate(proto::GenerateRequest),
    EnhanceTask(proto::EnhanceTaskRequest),
    DecomposeTask(proto::DecomposeTaskRequest),
    GetStatus,
}

impl Call {
    /// The call a ghz `call` names (`package.Service.Method` or
    /// `package.Service/Method`), its message read from `data` in the
    /// protobuf JSON mapping, as ghz reads it.
    pub fn from_ghz(call: &str, data: &Value) -> Result<Self, String> {
        let method = call
            .rsplit(['.', '/'])
            .next()
            .filter(|_| call.starts_with("rigger.inference.v1.InferenceService"))
            .ok_or_else(|| {
                format!("{call:?} is not a method of rigger.inference.v1.InferenceService")
            })?;
        let data = if data.is_null() {
            json!({})
        } else {
            data.clone()
        };
        Ok(match method {
            "Generate" => Self::Generate(message(&data, "GenerateRequest")?),
            "EnhanceTask" => Self::EnhanceTask(message(&data, "EnhanceTaskRequest")?),
            "DecomposeTask" => Self::DecomposeTask(message(&data, "DecomposeTaskRequest")?),
            "GetStatus" => Self::GetStatus,
            other => return Err(format!("unknown method {other:?}")),
        })
    }
}

/// `data` as the message `name` of the service's contracts.
fn message<T: prost::Message + Default>(data: &Value, name: &str) -> Result<T, String> {
    let pool = DescriptorPool::decode(proto::FILE_DESCRIPTOR_SET)
        .map_err(|error| format!("the service's descriptors: {error}"))?;
    let descriptor = pool
        .get_message_by_name(&format!("rigger.inference.v1.{name}"))
        .ok_or_else(|| format!("no message {name}"))?;
    let dynamic = DynamicMessage::deserialize(descriptor, data)
        .map_err(|error| format!("data is not a {name}: {error}"))?;
    dynamic
        .transcode_to()
        .map_err(|error| format!("data is not a {name}: {error}"))
}

/// When a run ends.
#[derive(Clone, Copy, Debug)]
pub enum Stop {
    Total(usize),
    After(Duration),
}

#[derive(Clone, Debug)]
pub struct Plan {
    pub concurrency: usize,
    pub stop: Stop,
    /// Requests per second across all workers; unset: as fast as they go.
    pub rps: Option<f64>,
    /// Requests sent first and left out of the report.
    pub warmup: usize,
    pub timeout: Duration,
    pub metadata: HashMap<String, String>,
}

impl Plan {
    /// The plan a ghz config describes, with ghz's defaults.
    pub fn from_ghz(config: &GhzConfig) -> Result<Self, String> {
        let duration = |text: &Option<String>| {
            text.as_deref()
                .map(humantime::parse_duration)
                .transpose()
                .map_err(|error| format!("a duration: {error}"))
        };
        let stop = match (config.total, duration(&config.duration)?) {
            (_, Some(after)) if !after.is_zero() => Stop::After(after),
            (total, _) => Stop::Total(total.unwrap_or(GHZ_TOTAL)),
        };
        Ok(Self {
            concurrency: config.concurrency.unwrap_or(GHZ_CONCURRENCY).max(1),
            stop,
            rps: config.rps.filter(|rps| *rps > 0.0),
            warmup: config.skip_first.unwrap_or(0),
            timeout: duration(&config.timeout)?.unwrap_or(GHZ_TIMEOUT),
            metadata: config.metadata.clone(),
        })
    }
}

/// What a run measured.
#[derive(Clone, Debug)]
pub struct Report {
    pub total: Duration,
    /// Latencies of the calls that ended OK, sorted.
    pub latencies: Vec<Duration>,
    /// Calls by final status code, OK included.
    pub codes: BTreeMap<String, usize>,
}

impl Report {
    pub fn count(&self) -> usize {
        self.codes.values().sum()
    }

    pub fn rps(&self) -> f64 {
        self.count() as f64 / self.total.as_secs_f64()
    }

    /// The latency below which `share` of the OK calls ended.
    pub fn percentile(&self, share: f64) -> Option<Duration> {
        let last = self.latencies.len().checked_sub(1)?;
        Some(self.latencies[((last as f64) * share).round() as usize])
    }

    pub fn mean(&self) -> Option<Duration> {
        let count = u32::try_from(self.latencies.len())
            .ok()
            .filter(|n| *n > 0)?;
        Some(self.latencies.iter().sum::<Duration>() / count)
    }

    fn millis(value: Option<Duration>) -> Value {
        value.map_or(Value::Null, |value| json!(value.as_secs_f64() * 1000.0))
    }

    pub fn to_json(&self) -> Value {
        json!({
            "count": self.count(),
            "total_ms": self.total.as_secs_f64() * 1000.0,
            "rps": self.rps(),
            "latency_ms": {
                "fastest": Self::millis(self.latencies.first().copied()),
                "average": Self::millis(self.mean()),
                "p50": Self::millis(self.percentile(0.5)),
                "p90": Self::millis(self.percentile(0.9)),
                "p99": Self::millis(self.percentile(0.99)),
                "slowest": Self::millis(self.latencies.last().copied()),
            },
            "status_codes": self.codes,
        })
    }

    /// ghz's summary layout.
    pub fn to_text(&self) -> String {
        let ms = |value: Option<Duration>| {
            value.map_or_else(
                || "-".to_owned(),
                |value| format!("{:.2} ms", value.as_secs_f64() * 1000.0),
            )
        };
        let mut text = format!(
            "Summary:\n  Count:\t{}\n  Total:\t{:.2} ms\n  Slowest:\t{}\n  Fastest:\t{}\n  Average:\t{}\n  Requests/sec:\t{:.2}\n\nLatency distribution:\n",
            self.count(),
            self.total.as_secs_f64() * 1000.0,
            ms(self.latencies.last().copied()),
            ms(self.latencies.first().copied()),
            ms(self.mean()),
            self.rps()
        );
        for share in [0.1f64, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99] {
            text.push_str(&format!(
                "  {} % in {}\n",
                (share * 100.0).round(),
                ms(self.percentile(share))
            ));
        }
        text.push_str("\nStatus code distribution:\n");
        for (code, count) in &self.codes {
            text.push_str(&format!("  [{code}]\t{count} responses\n"));
        }
        text
    }
}

/// Runs `call` as `plan` says over `channel`.
pub async fn run(channel: Channel, call: Call, plan: Plan) -> Report {
    let client = InferenceServiceClient::new(channel)
        .max_decoding_message_size(usize::MAX)
        .max_encoding_message_size(usize::MAX);
    for _ in 0..plan.warmup {
        once(&mut client.clone(), &call, &plan).await;
    }
    let issued = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let workers = (0..plan.concurrency).map(|_| {
        let (mut client, call, plan, issued) =
            (client.clone(), call.clone(), plan.clone(), issued.clone());
        async move {
            let mut latencies = Vec::new();
            let mut codes: BTreeMap<String, usize> = BTreeMap::new();
            loop {
                let ticket = issued.fetch_add(1, Ordering::Relaxed);
                let more = match plan.stop {
                    Stop::Total(total) => ticket < total,
                    Stop::After(limit) => started.elapsed() < limit,
                };
                if !more {
                    break;
                }
                if let Some(rps) = plan.rps {
                    let due = started + Duration::from_secs_f64(ticket as f64 / rps);
                    tokio::time::sleep_until(due.into()).await;
                }
                let (code, latency) = once(&mut client, &call, &plan).await;
                if code == Code::Ok {
                    latencies.push(latency);
                }
                *codes.entry(format!("{code:?}")).or_default() += 1;
            }
            (latencies, codes)
        }
    });
    let results = join_all(workers).await;
    let total = started.elapsed();
    let mut latencies = Vec::new();
    let mut codes = BTreeMap::new();
    for (worker_latencies, worker_codes) in results {
        latencies.extend(worker_latencies);
        for (code, count) in worker_codes {
            *codes.entry(code).or_default() += count;
        }
    }
    latencies.sort();
    Report {
        total,
        latencies,
        codes,
    }
}

/// One call, to its end (a stream read through its summary).
async fn once(
    client: &mut InferenceServiceClient<Channel>,
    call: &Call,
    plan: &Plan,
) -> (Code, Duration) {
    fn request<T>(message: T, plan: &Plan) -> Request<T> {
        let mut request = Request::new(message);
        request.set_timeout(plan.timeout);
        for (key, value) in &plan.metadata {
            if let (Ok(key), Ok(value)) = (
                key.parse::<tonic::metadata::MetadataKey<_>>(),
                value.parse::<MetadataValue<_>>(),
            ) {
                request.metadata_mut().insert(key, value);
            }
        }
        request
    }
    let started = Instant::now();
    let outcome = match call {
        Call::Generate(message) => match client.generate(request(message.clone(), plan)).await {
            Ok(response) => {
                let mut stream = response.into_inner();
                let mut outcome = Ok(());
                while let Some(item) = stream.next().await {
                    if let Err(status) = item {
                        outcome = Err(status);
                        break;
                    }
                }
                outcome
            }
            Err(status) => Err(status),
        },
        Call::EnhanceTask(message) => client
            .enhance_task(request(message.clone(), plan))
            .await
            .map(drop),
        Call::DecomposeTask(message) => client
            .decompose_task(request(message.clone(), plan))
            .await
            .map(drop),
        Call::GetStatus => client
            .get_status(request(proto::GetStatusRequest {}, plan))
            .await
            .map(drop),
    };
    let code = outcome.err().map_or(Code::Ok, |status| status.code());
    (code, started.elapsed())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ghz_data_becomes_the_typed_request() {
        let call = Call::from_ghz(
            "rigger.inference.v1.InferenceService/Generate",
            &json!({"prompt": "Hi", "sampling": {"maxTokens": 16, "temperature": 0}}),
        )
        .unwrap();
        let Call::Generate(request) = call else {
            panic!("a Generate call")
        };
        assert_eq!(request.prompt, "Hi");
        assert_eq!(request.sampling.unwrap().max_tokens, Some(16));
        let enhance = Call::from_ghz(
            "rigger.inference.v1.InferenceService.EnhanceTask",
            &json!({"task": {"title": "T"}, "kind": "ENHANCEMENT_KIND_SPECIFY"}),
        )
        .unwrap();
        assert!(matches!(enhance, Call::EnhanceTask(request)
            if request.kind == proto::EnhancementKind::Specify as i32));
        for (call, data) in [
            ("other.Service.Method", json!({})),
            ("rigger.inference.v1.InferenceService.Nope", json!({})),
            (
                "rigger.inference.v1.InferenceService.Generate",
                json!({"promptt": "typo"}),
            ),
        ] {
            assert!(Call::from_ghz(call, &data).is_err(), "{call} {data}");
        }
    }

    #[test]
    fn reports_percentiles_and_codes_in_ghz_terms() {
        let report = Report {
            total: Duration::from_secs(2),
            latencies: (1..=100).map(Duration::from_millis).collect(),
            codes: BTreeMap::from([("Ok".to_owned(), 100), ("ResourceExhausted".to_owned(), 4)]),
        };
        assert_eq!(report.count(), 104);
        assert_eq!(report.rps(), 52.0);
        assert_eq!(report.percentile(0.5), Some(Duration::from_millis(51)));
        assert_eq!(report.percentile(0.99), Some(Duration::from_millis(99)));
        let text = report.to_text();
        assert!(text.contains("Requests/sec:\t52.00"), "{text}");
        assert!(text.contains("[ResourceExhausted]\t4 responses"), "{text}");
        assert_eq!(report.to_json()["status_codes"]["Ok"], 100);
    }
}
