//! Graceful drain: after SIGTERM new calls are refused with UNAVAILABLE,
//! open calls run to their end within the grace period, and streams still
//! open after it end as cancelled.

use tokio_util::{
    sync::CancellationToken,
    task::{TaskTracker, task_tracker::TaskTrackerToken},
};
use tonic::Status;

use super::status;

#[derive(Clone, Default)]
pub(super) struct Drain {
    draining: CancellationToken,
    calls: TaskTracker,
    cut: CancellationToken,
}

impl Drain {
    /// Admits a call, which counts as open until the returned token drops.
    pub(super) fn admit(&self) -> Result<TaskTrackerToken, Status> {
        if self.draining.is_cancelled() {
            return Err(status::shutting_down());
        }
        Ok(self.calls.token())
    }

    /// Fires when open streams must end now.
    pub(super) fn cut(&self) -> CancellationToken {
        self.cut.clone()
    }

    /// Refuses new calls and waits for the open ones, at most `grace`; then
    /// cuts the streams still open and gives them `flush` to say so.
    pub(super) async fn run(&self, grace: std::time::Duration, flush: std::time::Duration) {
        self.draining.cancel();
        self.calls.close();
        if tokio::time::timeout(grace, self.calls.wait()).await.is_ok() {
            return;
        }
        tracing::warn!("grace period over; cancelling open calls");
        self.cut.cancel();
        let _ = tokio::time::timeout(flush, self.calls.wait()).await;
    }
}
