//! Admission: at most `max_in_flight` generations run at once; the next
//! `max_queue` wait, interactive calls ahead of batch ones; beyond that a
//! call is refused at once with RESOURCE_EXHAUSTED and a `retry-after` hint.
//!
//! A waiting call that goes away (cancelled, deadline passed) leaves the
//! queue; a slot handed to a caller that has just left passes to the next.

use std::{
    collections::VecDeque,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use tokio::sync::oneshot;
use tonic::Status;

use super::{status, validate::ValidationError};

/// Metadata key a caller sets to `batch` to yield to interactive calls.
pub const PRIORITY_HEADER: &str = "rigger-priority";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Priority {
    Interactive,
    Batch,
}

impl Priority {
    pub fn name(self) -> &'static str {
        match self {
            Self::Interactive => "interactive",
            Self::Batch => "batch",
        }
    }

    /// The priority a request asks for in its metadata; interactive unless
    /// it says `batch`. Anything else is refused, naming the header.
    pub fn of<T>(request: &tonic::Request<T>) -> Result<Self, Status> {
        match request.metadata().get(PRIORITY_HEADER) {
            None => Ok(Self::Interactive),
            Some(value) => match value.to_str() {
                Ok("interactive") => Ok(Self::Interactive),
                Ok("batch") => Ok(Self::Batch),
                _ => Err(ValidationError {
                    field: PRIORITY_HEADER.to_owned(),
                    reason: format!("{value:?} is neither \"interactive\" nor \"batch\""),
                }
                .into()),
            },
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AdmissionLimits {
    pub max_in_flight: usize,
    pub max_queue: usize,
}

/// What admission looks like now and since start.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdmissionStats {
    pub limits: AdmissionLimits,
    pub in_flight: usize,
    pub queued_interactive: usize,
    pub queued_batch: usize,
    pub admitted: u64,
    pub rejected: u64,
    /// Mean time admitted calls waited in the queue (0 for those that did not).
    pub mean_wait: Duration,
}

#[derive(Default)]
struct State {
    in_flight: usize,
    interactive: VecDeque<oneshot::Sender<Permit>>,
    batch: VecDeque<oneshot::Sender<Permit>>,
    admitted: u64,
    rejected: u64,
    waited: Duration,
    /// Exponentially weighted mean of how long an admitted call runs.
    mean_run: Option<Duration>,
}

impl State {
    fn queued(&self) -> usize {
        self.interactive.len() + self.batch.len()
    }

    /// Drops the places of callers that left while waiting (cancelled,
    /// deadline passed), so they neither fill the queue nor show in it.
    fn forget_departed(&mut self) {
        self.interactive.retain(|waiter| !waiter.is_closed());
        self.batch.retain(|waiter| !waiter.is_closed());
    }
}

pub struct Admission {
    limits: AdmissionLimits,
    state: Mutex<State>,
}

/// A running call's slot; dropping it frees the slot for the next caller.
pub struct Permit {
    /// `None` once the slot has been accounted for elsewhere.
    admission: Option<Arc<Admission>>,
    started: Instant,
}

impl Admission {
    pub fn new(limits: AdmissionLimits) -> Arc<Self> {
        Arc::new(Self {
            limits,
            state: Mutex::new(State::default()),
        })
    }

    /// Waits for a slot, or refuses at once when the queue is full.
    pub async fn admit(self: &Arc<Self>, priority: Priority) -> Result<Permit, Status> {
        let arrived = Instant::now();
        let waiting = {
            let mut state = self.lock();
            state.forget_departed();
            if state.in_flight < self.limits.max_in_flight && state.queued() == 0 {
                state.in_flight += 1;
                state.admitted += 1;
                return Ok(self.permit());
            }
            if state.queued() >= self.limits.max_queue {
                state.rejected += 1;
                return Err(self.refusal(&state));
            }
            let (sender, receiver) = oneshot::channel();
            match priority {
                Priority::Interactive => state.interactive.push_back(sender),
                Priority::Batch => state.batch.push_back(sender),
            }
            receiver
        };
        let mut permit = waiting.await.map_err(|_| status::admission_closed())?;
        permit.started = Instant::now();
        let mut state = self.lock();
        state.admitted += 1;
        state.waited += arrived.elapsed();
        Ok(permit)
    }

    pub fn stats(&self) -> AdmissionStats {
        let mut state = self.lock();
        state.forget_departed();
        AdmissionStats {
            limits: self.limits,
            in_flight: state.in_flight,
            queued_interactive: state.interactive.len(),
            queued_batch: state.batch.len(),
            admitted: state.admitted,
            rejected: state.rejected,
            mean_wait: state
                .waited
                .checked_div(u32::try_from(state.admitted).unwrap_or(u32::MAX))
                .unwrap_or_default(),
        }
    }

    fn permit(self: &Arc<Self>) -> Permit {
        Permit {
            admission: Some(self.clone()),
            started: Instant::now(),
        }
    }

    /// RESOURCE_EXHAUSTED with an estimate of when a slot frees up: the
    /// queue ahead drains at the running calls' mean pace.
    fn refusal(&self, state: &State) -> Status {
        let run = state.mean_run.unwrap_or(Duration::from_secs(1));
        let rounds = (state.queued() / self.limits.max_in_flight.max(1)) as u32 + 1;
        let retry_after = Duration::from_secs((run * rounds).as_secs()).max(MIN_RETRY_AFTER);
        status::queue_full(state.in_flight, state.queued(), retry_after)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }
}

/// The shortest retry hint: `retry-after` counts whole seconds.
const MIN_RETRY_AFTER: Duration = Duration::from_secs(1);

/// Weight of the latest call in the mean run time.
const RUN_TIME_WEIGHT: f64 = 0.2;

impl Drop for Permit {
    fn drop(&mut self) {
        let Some(admission) = self.admission.take() else {
            return;
        };
        let mut state = admission.lock();
        let ran = self.started.elapsed();
        state.mean_run = Some(match state.mean_run {
            Some(mean) => mean.mul_f64(1.0 - RUN_TIME_WEIGHT) + ran.mul_f64(RUN_TIME_WEIGHT),
            None => ran,
        });
        // The slot passes to the first waiter still there, interactive first.
        while let Some(next) = state
            .interactive
            .pop_front()
            .or_else(|| state.batch.pop_front())
        {
            match next.send(admission.permit()) {
                Ok(()) => return,
                // That caller left: its permit comes back unused, and the
                // next one is tried.
                Err(mut returned) => {
                    returned.admission = None;
                }
            }
        }
        state.in_flight -= 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn admission(max_in_flight: usize, max_queue: usize) -> Arc<Admission> {
        Admission::new(AdmissionLimits {
            max_in_flight,
            max_queue,
        })
    }

    #[tokio::test]
    async fn beyond_the_queue_calls_are_refused_at_once_with_a_retry_hint() {
        let admission = admission(1, 1);
        let running = admission.admit(Priority::Interactive).await.unwrap();
        let waiting = tokio::spawn({
            let admission = admission.clone();
            async move { admission.admit(Priority::Interactive).await.map(|_| ()) }
        });
        while admission.stats().queued_interactive == 0 {
            tokio::task::yield_now().await;
        }
        let refused_at = Instant::now();
        let refused = admission.admit(Priority::Batch).await.err().unwrap();
        assert!(refused_at.elapsed() < Duration::from_millis(10));
        assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
        assert!(refused.metadata().get(status::RETRY_AFTER).is_some());
        drop(running);
        waiting.await.unwrap().unwrap();
        let stats = admission.stats();
        assert_eq!((stats.in_flight, stats.admitted, stats.rejected), (0, 2, 1));
    }

    #[tokio::test]
    async fn interactive_calls_go_before_batch_calls() {
        let admission = admission(1, 8);
        let running = admission.admit(Priority::Interactive).await.unwrap();
        let (order, mut served) = tokio::sync::mpsc::unbounded_channel();
        let mut waiters = Vec::new();
        for (name, priority) in [
            ("batch", Priority::Batch),
            ("interactive", Priority::Interactive),
        ] {
            let (waiter, order) = (admission.clone(), order.clone());
            waiters.push(tokio::spawn(async move {
                let _permit = waiter.admit(priority).await.unwrap();
                order.send(name).unwrap();
            }));
            while admission.stats().queued_interactive + admission.stats().queued_batch
                < waiters.len()
            {
                tokio::task::yield_now().await;
            }
        }
        drop(running);
        assert_eq!(served.recv().await, Some("interactive"));
        assert_eq!(served.recv().await, Some("batch"));
    }

    #[tokio::test]
    async fn a_waiter_that_leaves_gives_its_turn_to_the_next() {
        let admission = admission(1, 8);
        let running = admission.admit(Priority::Interactive).await.unwrap();
        let leaving = tokio::spawn({
            let admission = admission.clone();
            async move { admission.admit(Priority::Interactive).await.map(|_| ()) }
        });
        let staying = tokio::spawn({
            let admission = admission.clone();
            async move { admission.admit(Priority::Interactive).await.map(|_| ()) }
        });
        while admission.stats().queued_interactive < 2 {
            tokio::task::yield_now().await;
        }
        leaving.abort();
        let _ = leaving.await;
        drop(running);
        staying.await.unwrap().unwrap();
        assert_eq!(admission.stats().in_flight, 0, "every slot came back");
    }

    #[test]
    fn the_priority_header_is_read_and_checked() {
        let mut request = tonic::Request::new(());
        assert_eq!(Priority::of(&request).unwrap(), Priority::Interactive);
        request
            .metadata_mut()
            .insert(PRIORITY_HEADER, "batch".parse().unwrap());
        assert_eq!(Priority::of(&request).unwrap(), Priority::Batch);
        request
            .metadata_mut()
            .insert(PRIORITY_HEADER, "urgent".parse().unwrap());
        let status = Priority::of(&request).unwrap_err();
        assert!(status.message().contains(PRIORITY_HEADER));
    }
}
