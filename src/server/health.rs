//! The standard gRPC health service (`grpc.health.v1.Health`), kept current
//! by a background prober.
//!
//! Entries: `""` (the process is up), the inference service (ready: the
//! active backend answered its last probe) and `rigger.backend.<name>` per
//! configured backend. Implemented here rather than with tonic-health's
//! reporter to follow the protocol where that one does not: Watch on an
//! unknown service answers SERVICE_UNKNOWN (not an error) and stays open, an
//! entry is re-sent only when its status changes, and on shutdown every Watch
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
use tonic::{Request, Response, Status, server::NamedService};
use tonic_health::pb::{
    HealthCheckRequest, HealthCheckResponse, health_check_response::ServingStatus,
    health_server::Health,
};

use crate::{
    backend::{BackendHealth, BackendRegistry, BackendSnapshot},
    proto::inference_service_server::InferenceServiceServer,
};

pub use tonic_health::pb::health_server::HealthServer;

/// Health entry of the inference service: SERVING when requests can be served.
pub const INFERENCE_SERVICE: &str =
    <InferenceServiceServer<super::service::InferenceApi> as NamedService>::NAME;

/// Health entry mirroring one backend.
pub fn backend_service(name: &str) -> String {
    format!("rigger.backend.{name}")
}

/// Current status of every health entry, and its watchers.
pub struct HealthBoard {
    entries: RwLock<HashMap<String, watch::Sender<ServingStatus>>>,
    /// Ends Watch streams of unknown services at shutdown.
    closing: CancellationToken,
}

impl HealthBoard {
    /// The entries of a server over `registry`: the process SERVING, the
    /// inference service NOT_SERVING until its backend answers a probe.
    pub(super) fn new(registry: &BackendRegistry) -> Arc<Self> {
        let mut entries = HashMap::new();
        let mut add = |service: String, status| {
            entries.insert(service, watch::Sender::new(status));
        };
        add(String::new(), ServingStatus::Serving);
        add(INFERENCE_SERVICE.to_owned(), ServingStatus::NotServing);
        for snapshot in registry.snapshots() {
            add(
                backend_service(snapshot.name),
                serving_status(snapshot.health),
            );
        }
        let board = Arc::new(Self {
            entries: RwLock::new(entries),
            closing: CancellationToken::new(),
        });
        // `auto` selection has probed already: start from what it learned.
        board.publish(&registry.snapshots());
        board
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
            self.set(
                &backend_service(snapshot.name),
                serving_status(snapshot.health),
            );
            if snapshot.active {
                let status = if snapshot.health == BackendHealth::Serving {
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
            None => Err(Status::not_found(format!("unknown service {service:?}"))),
        }
    }

    type WatchStream = HealthStream;

    async fn watch(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let service = request.into_inner().service;
        let receiver = {
            let entries = self
                .entries
                .read()
                .unwrap_or_else(|poison| poison.into_inner());
            entries.get(&service).map(watch::Sender::subscribe)
        };
        let closing = self.closing.clone();
        let stream: HealthStream = match receiver {
            Some(receiver) => Box::pin(watch_changes(receiver, closing)),
            // The set of entries is fixed for the life of the process, so an
            // unknown service stays unknown: one message, then quiet.
            None => Box::pin(
                stream::once(async { Ok(response(ServingStatus::ServiceUnknown)) })
                    .chain(stream::pending())
                    .take_until(closing.cancelled_owned()),
            ),
        };
        Ok(Response::new(stream))
    }
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

fn serving_status(health: BackendHealth) -> ServingStatus {
    match health {
        BackendHealth::Unknown => ServingStatus::Unknown,
        BackendHealth::Serving => ServingStatus::Serving,
        BackendHealth::NotServing => ServingStatus::NotServing,
    }
}

/// Probes every backend each `interval` until `stop`, publishing results.
pub(super) async fn probe_until(
    registry: Arc<BackendRegistry>,
    board: Arc<HealthBoard>,
    interval: Duration,
    stop: CancellationToken,
) {
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = ticks.tick() => {}
        }
        let snapshots = tokio::select! {
            _ = stop.cancelled() => return,
            snapshots = registry.probe_all() => snapshots,
        };
        board.publish(&snapshots);
    }
}
