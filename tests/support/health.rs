//! The gRPC health protocol as the tests use it: Check an entry, Watch it,
//! and wait on a Watch stream for a status.

use std::time::Duration;

use futures_util::StreamExt;
use tonic::{Streaming, transport::Channel};
use tonic_health::pb::{
    HealthCheckRequest, HealthCheckResponse, health_check_response::ServingStatus,
    health_client::HealthClient,
};

/// How long a Watch stream may take to report a change: a probe interval
/// or a restarted runtime.
const WAIT: Duration = Duration::from_secs(20);

/// The status Check reports for a known `service`.
pub async fn check(channel: &Channel, service: &str) -> ServingStatus {
    let response = HealthClient::new(channel.clone())
        .check(HealthCheckRequest {
            service: service.into(),
        })
        .await
        .expect("a known service")
        .into_inner();
    ServingStatus::try_from(response.status).expect("a known status")
}

pub async fn watch(channel: &Channel, service: &str) -> Streaming<HealthCheckResponse> {
    HealthClient::new(channel.clone())
        .watch(HealthCheckRequest {
            service: service.into(),
        })
        .await
        .expect("Watch starts")
        .into_inner()
}

/// The next status on a Watch stream.
pub async fn next_status(watch: &mut Streaming<HealthCheckResponse>) -> ServingStatus {
    let message = tokio::time::timeout(WAIT, watch.next())
        .await
        .expect("a health change within the wait")
        .expect("the watch stream stays open")
        .expect("no error on the watch stream");
    ServingStatus::try_from(message.status).expect("a known status")
}

/// Reads a Watch stream until it reports `wanted`.
pub async fn watch_until(watch: &mut Streaming<HealthCheckResponse>, wanted: ServingStatus) {
    while next_status(watch).await != wanted {}
}
