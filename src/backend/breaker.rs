//! A circuit breaker per backend: after enough consecutive failures calls
//! skip the backend (open); after a cooldown one trial call may test it
//! (half-open); the trial's success closes the circuit, its failure opens it
//! again for another cooldown.

use std::time::{Duration, Instant};

/// When a circuit opens and how long it stays open.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BreakerPolicy {
    /// Consecutive failures that open the circuit.
    pub failures: u32,
    /// How long an open circuit refuses calls before allowing a trial.
    pub cooldown: Duration,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CircuitState {
    /// Calls go through.
    Closed,
    /// Calls skip the backend until the cooldown ends.
    Open,
    /// The cooldown ended: the next call is a trial.
    HalfOpen,
}

#[derive(Debug)]
pub(crate) struct Breaker {
    policy: BreakerPolicy,
    consecutive_failures: u32,
    opened_at: Option<Instant>,
    /// When the current half-open trial started. A trial whose outcome never
    /// arrives (its caller left first) stops blocking others after a
    /// cooldown, so the circuit cannot stay half-open for good.
    trial_started: Option<Instant>,
}

impl Breaker {
    pub(crate) fn new(policy: BreakerPolicy) -> Self {
        Self {
            policy,
            consecutive_failures: 0,
            opened_at: None,
            trial_started: None,
        }
    }

    pub(crate) fn state(&self, now: Instant) -> CircuitState {
        match self.opened_at {
            None => CircuitState::Closed,
            Some(opened) if now.duration_since(opened) < self.policy.cooldown => CircuitState::Open,
            Some(_) => CircuitState::HalfOpen,
        }
    }

    pub(crate) fn consecutive_failures(&self) -> u32 {
        self.consecutive_failures
    }

    /// When an open circuit will allow its trial; `None` unless open.
    pub(crate) fn reopens_in(&self, now: Instant) -> Option<Duration> {
        let opened = self.opened_at?;
        self.policy
            .cooldown
            .checked_sub(now.duration_since(opened))
            .filter(|left| !left.is_zero())
    }

    /// Whether a call may go to the backend now; in half-open state only
    /// one trial at a time.
    pub(crate) fn admit(&mut self, now: Instant) -> bool {
        match self.state(now) {
            CircuitState::Closed => true,
            CircuitState::Open => false,
            CircuitState::HalfOpen => {
                let trial_running = self
                    .trial_started
                    .is_some_and(|started| now.duration_since(started) < self.policy.cooldown);
                if trial_running {
                    return false;
                }
                self.trial_started = Some(now);
                true
            }
        }
    }

    pub(crate) fn succeeded(&mut self) {
        self.consecutive_failures = 0;
        self.opened_at = None;
        self.trial_started = None;
    }

    pub(crate) fn failed(&mut self, now: Instant) {
        self.consecutive_failures = self.consecutive_failures.saturating_add(1);
        let trial_failed = self.opened_at.is_some();
        if trial_failed || self.consecutive_failures >= self.policy.failures {
            self.opened_at = Some(now);
            self.trial_started = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const COOLDOWN: Duration = Duration::from_secs(10);

    fn breaker() -> Breaker {
        Breaker::new(BreakerPolicy {
            failures: 3,
            cooldown: COOLDOWN,
        })
    }

    #[test]
    fn opens_after_the_configured_consecutive_failures_only() {
        let now = Instant::now();
        let mut breaker = breaker();
        breaker.failed(now);
        breaker.failed(now);
        breaker.succeeded();
        breaker.failed(now);
        breaker.failed(now);
        assert_eq!(breaker.state(now), CircuitState::Closed, "a success resets");
        assert!(breaker.admit(now));
        breaker.failed(now);
        assert_eq!(breaker.state(now), CircuitState::Open);
        assert!(!breaker.admit(now + COOLDOWN / 2));
        assert_eq!(breaker.reopens_in(now + COOLDOWN / 2), Some(COOLDOWN / 2));
    }

    #[test]
    fn half_open_lets_one_trial_through_and_its_outcome_decides() {
        let opened = Instant::now();
        let mut breaker = breaker();
        for _ in 0..3 {
            breaker.failed(opened);
        }
        let later = opened + COOLDOWN;
        assert_eq!(breaker.state(later), CircuitState::HalfOpen);
        assert!(breaker.admit(later), "the trial");
        assert!(!breaker.admit(later), "one trial at a time");
        breaker.failed(later);
        assert_eq!(
            breaker.state(later),
            CircuitState::Open,
            "a failed trial opens the circuit again at once"
        );
        let after_second_cooldown = later + COOLDOWN;
        assert!(breaker.admit(after_second_cooldown));
        breaker.succeeded();
        assert_eq!(breaker.state(after_second_cooldown), CircuitState::Closed);
        assert_eq!(breaker.consecutive_failures(), 0);
        assert!(breaker.admit(after_second_cooldown));
    }

    #[test]
    fn a_trial_whose_caller_left_does_not_block_the_circuit_for_good() {
        let opened = Instant::now();
        let mut breaker = breaker();
        for _ in 0..3 {
            breaker.failed(opened);
        }
        let trial = opened + COOLDOWN;
        assert!(breaker.admit(trial));
        assert!(!breaker.admit(trial + COOLDOWN / 2));
        assert!(
            breaker.admit(trial + COOLDOWN),
            "after a cooldown without an outcome another trial may start"
        );
    }
}
