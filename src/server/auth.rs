//! Optional bearer-token authentication: calls carry
//! `authorization: Bearer <token>`; services listed as exempt (by default
//! health and reflection, so probes need no secret) do not.

use std::sync::Arc;

use tonic::{
    Request, Status,
    server::NamedService,
    service::{Interceptor, interceptor::InterceptedService},
};

use super::status;

/// The token calls must present, when authentication is on.
#[derive(Clone)]
pub struct BearerToken(Arc<str>);

impl BearerToken {
    pub fn new(token: &str) -> Self {
        Self(Arc::from(token))
    }

    /// Whether `presented` is the token, in time that does not depend on
    /// where they differ.
    fn matches(&self, presented: &str) -> bool {
        let (expected, presented) = (self.0.as_bytes(), presented.as_bytes());
        let differing = expected
            .iter()
            .zip(presented)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b));
        differing == 0 && expected.len() == presented.len()
    }
}

impl std::fmt::Debug for BearerToken {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str("BearerToken(<redacted>)")
    }
}

/// `service` behind the check its name calls for.
pub(super) fn guarded<S: NamedService>(
    service: S,
    token: Option<&BearerToken>,
    exempt: &[String],
) -> InterceptedService<S, Guard> {
    InterceptedService::new(service, Guard::of(token, exempt, S::NAME))
}

/// The check in front of one service: `None` lets every call through.
#[derive(Clone, Debug)]
pub struct Guard(Option<BearerToken>);

impl Guard {
    /// The guard of `service`: no check when authentication is off or the
    /// service is exempt.
    pub(super) fn of(token: Option<&BearerToken>, exempt: &[String], service: &str) -> Self {
        let exempted = exempt.iter().any(|name| name == service);
        Self(token.filter(|_| !exempted).cloned())
    }
}

impl Interceptor for Guard {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        let Some(token) = &self.0 else {
            return Ok(request);
        };
        let presented = request
            .metadata()
            .get("authorization")
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.strip_prefix("Bearer "));
        match presented {
            Some(presented) if token.matches(presented) => Ok(request),
            Some(_) => Err(status::invalid_token()),
            None => Err(status::missing_token()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(guard: &mut Guard, authorization: Option<&str>) -> Result<(), Status> {
        let mut request = Request::new(());
        if let Some(value) = authorization {
            request
                .metadata_mut()
                .insert("authorization", value.parse().unwrap());
        }
        guard.call(request).map(|_| ())
    }

    #[test]
    fn only_the_exact_token_passes_and_exempt_services_need_none() {
        let token = BearerToken::new("s3cret");
        let exempt = vec!["grpc.health.v1.Health".to_owned()];
        let mut guarded = Guard::of(
            Some(&token),
            &exempt,
            "rigger.inference.v1.InferenceService",
        );
        assert!(call(&mut guarded, Some("Bearer s3cret")).is_ok());
        for wrong in [
            None,
            Some("Bearer s3cre"),
            Some("Bearer s3cret2"),
            Some("s3cret"),
        ] {
            let status = call(&mut guarded, wrong).unwrap_err();
            assert_eq!(status.code(), tonic::Code::Unauthenticated, "{wrong:?}");
            assert!(!status.message().contains("s3cret"), "no secret in errors");
        }
        let mut exempted = Guard::of(Some(&token), &exempt, "grpc.health.v1.Health");
        assert!(call(&mut exempted, None).is_ok());
        let mut open = Guard::of(None, &exempt, "rigger.inference.v1.InferenceService");
        assert!(call(&mut open, None).is_ok());
        assert_eq!(format!("{token:?}"), "BearerToken(<redacted>)");
    }
}
