//! Server-side deadlines: every call ends by its deadline with
//! DEADLINE_EXCEEDED, streams included, and its backend work is dropped.
//!
//! A call's deadline is the client's `grpc-timeout`, capped at the
//! configured maximum, or the configured default when the client sends none.
//! tonic also arms the client's timeout around unary handlers, but answers
//! CANCELLED "Timeout expired" when it fires and leaves streams unbounded;
//! ours ends a little earlier ([`AHEAD_OF_CLIENT`]) so that callers get the
//! code the gRPC spec asks for.

use std::{future::Future, time::Duration};

use tokio::time::Instant;
use tonic::{Request, Status};

use super::status;

/// How much earlier than the client's own deadline a call is ended: enough
/// for the status to reach a loopback or LAN client before its timer fires
/// (5 ms was not, for a tonic client on this machine's debug build).
const AHEAD_OF_CLIENT: Duration = Duration::from_millis(20);

#[derive(Clone, Copy, Debug)]
pub struct DeadlinePolicy {
    /// Deadline of calls that carry none.
    pub default: Duration,
    /// Longest deadline a call gets, whatever the client asks.
    pub max: Duration,
}

/// When one call must end.
#[derive(Clone, Copy, Debug)]
pub(super) struct Deadline {
    at: Instant,
    budget: Duration,
}

impl DeadlinePolicy {
    pub(super) fn of<T>(&self, request: &Request<T>) -> Deadline {
        let budget = match client_timeout(request) {
            Some(asked) => asked.min(self.max).saturating_sub(AHEAD_OF_CLIENT),
            None => self.default,
        };
        Deadline {
            at: Instant::now() + budget,
            budget,
        }
    }
}

impl Deadline {
    /// Runs `work` until the deadline; past it the work is dropped.
    pub(super) async fn bound<T>(
        self,
        work: impl Future<Output = Result<T, Status>>,
    ) -> Result<T, Status> {
        tokio::time::timeout_at(self.at, work)
            .await
            .unwrap_or_else(|_| Err(self.expired()))
    }

    /// A timer that fires when the deadline passes.
    pub(super) fn timer(self) -> tokio::time::Sleep {
        tokio::time::sleep_until(self.at)
    }

    pub(super) fn expired(self) -> Status {
        status::deadline_exceeded(self.budget)
    }
}

/// The client's `grpc-timeout`: up to 8 digits and a unit (H, M, S, m, u, n).
fn client_timeout<T>(request: &Request<T>) -> Option<Duration> {
    let value = request.metadata().get("grpc-timeout")?.to_str().ok()?;
    if value.len() < 2 || value.len() > 9 {
        return None;
    }
    let (digits, unit) = value.split_at(value.len() - 1);
    let amount: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(amount.saturating_mul(3600)),
        "M" => Duration::from_secs(amount.saturating_mul(60)),
        "S" => Duration::from_secs(amount),
        "m" => Duration::from_millis(amount),
        "u" => Duration::from_micros(amount),
        "n" => Duration::from_nanos(amount),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(timeout: Option<&'static str>) -> Request<()> {
        let mut request = Request::new(());
        if let Some(timeout) = timeout {
            request
                .metadata_mut()
                .insert("grpc-timeout", timeout.parse().unwrap());
        }
        request
    }

    const POLICY: DeadlinePolicy = DeadlinePolicy {
        default: Duration::from_secs(300),
        max: Duration::from_secs(600),
    };

    #[test]
    fn the_client_timeout_is_read_in_every_unit() {
        let read = |value| client_timeout(&request(Some(value)));
        assert_eq!(read("2H"), Some(Duration::from_secs(7200)));
        assert_eq!(read("3M"), Some(Duration::from_secs(180)));
        assert_eq!(read("250m"), Some(Duration::from_millis(250)));
        assert_eq!(read("7S"), Some(Duration::from_secs(7)));
        assert_eq!(read("99u"), Some(Duration::from_micros(99)));
        assert_eq!(read("5n"), Some(Duration::from_nanos(5)));
        for malformed in ["", "S", "12", "1x", "123456789S", "-1S"] {
            assert_eq!(read(malformed), None, "{malformed:?}");
        }
    }

    #[test]
    fn the_deadline_is_the_clients_capped_or_the_default() {
        assert_eq!(POLICY.of(&request(None)).budget, POLICY.default);
        assert_eq!(
            POLICY.of(&request(Some("1H"))).budget,
            POLICY.max - AHEAD_OF_CLIENT
        );
        assert_eq!(
            POLICY.of(&request(Some("100m"))).budget,
            Duration::from_millis(80)
        );
    }

    #[tokio::test]
    async fn work_past_the_deadline_is_dropped_with_deadline_exceeded() {
        let deadline = POLICY.of(&request(Some("20m")));
        let status = deadline
            .bound(async {
                tokio::time::sleep(Duration::from_secs(5)).await;
                Ok(())
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::DeadlineExceeded);
        let quick = POLICY.of(&request(Some("1S"))).bound(async { Ok(7) }).await;
        assert_eq!(quick.unwrap(), 7);
    }
}
