//! The standard gRPC health service (`grpc.health.v1.Health`), kept current
//! by a background prober.
//!
//! Entries: `""` (the process is up), the inference service (ready: the
//! active backend answered its last probe; NOT_SERVING while backends are
//! still being selected or a model loads) and `rigger.backend.<name>` per
//! configured backend, added once the backends exist. Implemented here rather
//! than with tonic-health's reporter to follow the protocol where that one
//! does not: Watch on an unknown service answers SERVICE_UNKNOWN (not an
//! error) and stays open, following the entry if it appears later; an entry
//! is re-sent only when its status changes; and on shutdown every Watch
//! stream gets NOT_SERVING and then ends instead of holding the drain open.

use std::{
    collections::HashMap,
    pin::Pin,
    sync::{Arc, RwLock},
    time::Duration,
};

use futures_util::{Stream, StreamExt, stream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};
use tonic_health::pb::{
    HealthCheckRequest, HealthCheckResponse, health_check_response::ServingStatus,
    health_server::Health,
};

use crate::{
    backend::{BackendHealth, BackendRegistry, BackendSnapshot, CircuitState, GenerationCheck},
    proto::inference_service_server::SERVICE_NAME,
};

pub use tonic_health::pb::health_server::HealthServer;

/// Health entry of the inference service: SERVING when requests can be served.
pub const INFERENCE_SERVICE: &str = SERVICE_NAME;

/// Health entry mirroring one backend.
pub fn backend_service(name: &str) -> String {
    format!("rigger.backend.{name}")
}

type Entries = RwLock<HashMap<String, watch::Sender<ServingStatus>>>;

/// Current status of every health entry, and its watchers.
pub struct HealthBoard {
    entries: Arc<Entries>,
    /// Bumped when entries are added, so Watch streams of services unknown
    /// so far can pick them up.
    added: watch::Sender<()>,
    /// Ends Watch streams of unknown services at shutdown.
    closing: CancellationToken,
}

impl HealthBoard {
    /// The entries of a starting server: the process SERVING, the inference
    /// service NOT_SERVING until its backend exists and answers a probe.
    pub(super) fn starting() -> Arc<Self> {
        let entries = HashMap::from([
            (String::new(), watch::Sender::new(ServingStatus::Serving)),
            (
                INFERENCE_SERVICE.to_owned(),
                watch::Sender::new(ServingStatus::NotServing),
            ),
        ]);
        Arc::new(Self {
            entries: Arc::new(RwLock::new(entries)),
            added: watch::Sender::new(()),
            closing: CancellationToken::new(),
        })
    }

    /// Adds an entry per backend of `registry` and publishes what selection
    /// learned (`auto` has probed them already).
    pub(super) fn register(&self, registry: &BackendRegistry) {
        let snapshots = registry.snapshots();
        {
            let mut entries = self
                .entries
                .write()
                .unwrap_or_else(|poison| poison.into_inner());
            for snapshot in &snapshots {
                entries
                    .entry(backend_service(snapshot.name))
                    .or_insert_with(|| watch::Sender::new(serving_status(snapshot)));
            }
        }
        self.added.send_replace(());
        self.publish(&snapshots);
    }

    fn status(&self, service: &str) -> Option<ServingStatus> {
        let entries = self
            .entries
            .read()
            .unwrap_or_else(|poison| poison.into_inner());
        entries.get(service).map(|sender| *sender.borrow())
    }

    fn set(&self, service: &str, status: ServingStatus) {
        let entries = self
            .entries
            .read()
            .unwrap_or_else(|poison| poison.into_inner());
        if let Some(sender) = entries.get(service) {
            sender.send_if_modified(|current| {
                let changed = *current != status;
                if changed {
                    tracing::info!(service, ?status, "health changed");
                    *current = status;
                }
                changed
            });
        }
    }

    pub(super) fn publish(&self, snapshots: &[BackendSnapshot]) {
        for snapshot in snapshots {
            self.set(&backend_service(snapshot.name), serving_status(snapshot));
            if snapshot.active {
                let status = if snapshot.serving() {
                    ServingStatus::Serving
                } else {
                    ServingStatus::NotServing
                };
                self.set(INFERENCE_SERVICE, status);
            }
        }
    }

    /// The first step of a graceful shutdown: every entry NOT_SERVING, and
    /// every Watch stream ends after it has been told so.
    pub(super) fn shutting_down(&self) {
        let entries = self
            .entries
            .read()
            .unwrap_or_else(|poison| poison.into_inner());
        for sender in entries.values() {
            sender.send_if_modified(|status| {
                let changed = *status != ServingStatus::NotServing;
                *status = ServingStatus::NotServing;
                changed
            });
        }
        drop(entries);
        self.closing.cancel();
    }
}

type HealthStream = Pin<Box<dyn Stream<Item = Result<HealthCheckResponse, Status>> + Send>>;

fn response(status: ServingStatus) -> HealthCheckResponse {
    HealthCheckResponse {
        status: status as i32,
    }
}

#[tonic::async_trait]
impl Health for HealthBoard {
    async fn check(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<HealthCheckResponse>, Status> {
        let service = request.into_inner().service;
        match self.status(&service) {
            Some(status) => Ok(Response::new(response(status))),
            None => Err(super::status::unknown_service(&service)),
        }
    }

    type WatchStream = HealthStream;

    async fn watch(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let service = request.into_inner().service;
        let closing = self.closing.clone();
        // Subscribed before the lookup, so an entry added in between is seen.
        let mut added = self.added.subscribe();
        let stream: HealthStream = match subscribe(&self.entries, &service) {
            Some(receiver) => Box::pin(watch_changes(receiver, closing)),
            None => {
                let entries = self.entries.clone();
                let stopping = closing.clone();
                let appeared = async move {
                    loop {
                        tokio::select! {
                            changed = added.changed() => changed.ok()?,
                            () = stopping.cancelled() => return None,
                        }
                        if let Some(receiver) = subscribe(&entries, &service) {
                            return Some(receiver);
                        }
                    }
                };
                Box::pin(
                    stream::once(async { Ok(response(ServingStatus::ServiceUnknown)) }).chain(
                        stream::once(appeared)
                            .filter_map(|receiver| async move { receiver })
                            .flat_map(move |receiver| watch_changes(receiver, closing.clone())),
                    ),
                )
            }
        };
        Ok(Response::new(stream))
    }
}

fn subscribe(entries: &Entries, service: &str) -> Option<watch::Receiver<ServingStatus>> {
    let entries = entries.read().unwrap_or_else(|poison| poison.into_inner());
    entries.get(service).map(watch::Sender::subscribe)
}

/// The current status, then each change, until shutdown. A change made just
/// before shutdown (NOT_SERVING) is still delivered: changes win the race.
fn watch_changes(
    receiver: watch::Receiver<ServingStatus>,
    closing: CancellationToken,
) -> impl Stream<Item = Result<HealthCheckResponse, Status>> {
    stream::unfold(
        (receiver, closing, true),
        |(mut receiver, closing, first)| async move {
            if !first {
                tokio::select! {
                    biased;
                    changed = receiver.changed() => changed.ok()?,
                    () = closing.cancelled() => return None,
                }
            }
            let status = *receiver.borrow_and_update();
            Some((Ok(response(status)), (receiver, closing, false)))
        },
    )
}

/// A backend's entry: its last probe, NOT_SERVING while its circuit is open.
fn serving_status(snapshot: &BackendSnapshot) -> ServingStatus {
    if snapshot.circuit == CircuitState::Open {
        return ServingStatus::NotServing;
    }
    match snapshot.health {
        BackendHealth::Unknown => ServingStatus::Unknown,
        BackendHealth::Serving => ServingStatus::Serving,
        BackendHealth::NotServing => ServingStatus::NotServing,
    }
}

/// Probes every backend each `interval` until `stop`, and makes the active
/// one prove it can generate when `generation` asks, publishing results;
/// a circuit that opens or closes between probes is published at once.
pub(super) async fn probe_until(
    registry: Arc<BackendRegistry>,
    board: Arc<HealthBoard>,
    interval: Duration,
    generation: Option<GenerationCheck>,
    stop: CancellationToken,
) {
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut circuits = registry.circuit_changes();
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = circuits.changed() => {
                board.publish(&registry.snapshots());
                continue;
            }
            _ = ticks.tick() => {}
        }
        let probes = async {
            registry.probe_all().await;
            if let Some(check) = generation {
                registry.check_generation(check).await;
            }
        };
        tokio::select! {
            _ = stop.cancelled() => return,
            () = probes => {}
        }
        board.publish(&registry.snapshots());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{
        BackendRegistry, BreakerPolicy, FailoverPolicy,
        ollama::{OllamaBackend, OllamaSettings},
    };

    async fn next(stream: &mut HealthStream) -> ServingStatus {
        let message = tokio::time::timeout(Duration::from_secs(5), stream.next())
            .await
            .expect("a message")
            .expect("the stream is open")
            .expect("no error");
        ServingStatus::try_from(message.status).unwrap()
    }

    #[tokio::test]
    async fn a_watch_on_an_entry_added_later_follows_it() {
        let board = HealthBoard::starting();
        let mut watch = board
            .watch(Request::new(HealthCheckRequest {
                service: backend_service("ollama"),
            }))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(next(&mut watch).await, ServingStatus::ServiceUnknown);

        let ollama = OllamaBackend::new(
            reqwest::Client::new(),
            OllamaSettings {
                host: "http://127.0.0.1:9".into(),
                model: None,
                keep_alive: None,
                probe_timeout: Duration::from_secs(1),
            },
        );
        let registry = BackendRegistry::new(
            vec![Arc::new(ollama)],
            Duration::from_secs(1),
            FailoverPolicy {
                breaker: BreakerPolicy {
                    failures: 3,
                    cooldown: Duration::from_secs(10),
                },
                retries: 0,
                backoff: Duration::from_millis(50),
            },
        );
        board.register(&registry);
        assert_eq!(
            next(&mut watch).await,
            ServingStatus::Unknown,
            "not probed yet"
        );
        board.shutting_down();
        assert_eq!(next(&mut watch).await, ServingStatus::NotServing);
        assert!(watch.next().await.is_none(), "ends at shutdown");
    }
}
