//! The standard gRPC health service, kept current by a background prober.
//!
//! Entries: `""` (the process is up), the inference service (ready: the
//! active backend answered its last probe) and `rigger.backend.<name>` per
//! configured backend. An entry changes only when its status does, so Watch
//! streams carry changes, not repeats.

use std::{collections::HashMap, sync::Arc, time::Duration};

use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;
use tonic::server::NamedService;
use tonic_health::{ServingStatus, server::HealthReporter};

use crate::{
    backend::{BackendHealth, BackendRegistry, BackendSnapshot},
    proto::inference_service_server::InferenceServiceServer,
};

/// Health entry of the inference service: SERVING when requests can be served.
pub const INFERENCE_SERVICE: &str =
    <InferenceServiceServer<super::service::InferenceApi> as NamedService>::NAME;

/// Health entry mirroring one backend.
pub fn backend_service(name: &str) -> String {
    format!("rigger.backend.{name}")
}

pub(super) struct HealthBoard {
    reporter: HealthReporter,
    published: Mutex<HashMap<String, ServingStatus>>,
}

impl HealthBoard {
    pub(super) async fn new(reporter: HealthReporter, registry: &BackendRegistry) -> Self {
        let board = Self {
            reporter,
            published: Mutex::new(HashMap::new()),
        };
        board
            .set(INFERENCE_SERVICE, ServingStatus::NotServing)
            .await;
        for snapshot in registry.snapshots() {
            board
                .set(
                    &backend_service(snapshot.name),
                    serving_status(snapshot.health),
                )
                .await;
        }
        board
    }

    async fn set(&self, service: &str, status: ServingStatus) {
        let mut published = self.published.lock().await;
        if published.get(service) != Some(&status) {
            tracing::info!(service, ?status, "health changed");
            self.reporter.set_service_status(service, status).await;
            published.insert(service.to_owned(), status);
        }
    }

    pub(super) async fn publish(&self, snapshots: &[BackendSnapshot]) {
        for snapshot in snapshots {
            self.set(
                &backend_service(snapshot.name),
                serving_status(snapshot.health),
            )
            .await;
            if snapshot.active {
                let ready = snapshot.health == BackendHealth::Serving;
                let status = if ready {
                    ServingStatus::Serving
                } else {
                    ServingStatus::NotServing
                };
                self.set(INFERENCE_SERVICE, status).await;
            }
        }
    }

    /// Marks every entry NOT_SERVING: the first step of a graceful shutdown.
    pub(super) async fn shutting_down(&self) {
        let services: Vec<String> = self.published.lock().await.keys().cloned().collect();
        for service in services.iter().map(String::as_str).chain([""]) {
            self.set(service, ServingStatus::NotServing).await;
        }
    }
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
        board.publish(&snapshots).await;
    }
}
