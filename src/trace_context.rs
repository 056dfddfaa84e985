//! W3C Trace Context: a call's `traceparent` (and `tracestate`) metadata is
//! read at the edge, carried with the call, recorded on the call's log span
//! and sent on to HTTP backends with the call's own span as their parent, so
//! a trace the orchestrator started runs through this service into the
//! runtime. A call without a valid `traceparent` starts a trace here, so its
//! logs and backend requests still share one id. With `--otlp-endpoint` the
//! call's span is exported too (`server::telemetry`).

use std::future::Future;

pub const TRACEPARENT: &str = "traceparent";
pub const TRACESTATE: &str = "tracestate";

/// Where a call sits in a trace: the trace, this service's span in it, and
/// the caller's sampling flags and vendor state, passed on unchanged.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TraceContext {
    trace_id: u128,
    span_id: u64,
    /// The caller's span, when the call continues a trace.
    parent_span_id: Option<u64>,
    flags: u8,
    state: Option<String>,
}

/// The `sampled` trace flag: the trace is being recorded.
const SAMPLED: u8 = 0x01;

tokio::task_local! {
    static CURRENT: TraceContext;
}

impl TraceContext {
    /// This service's span for a call whose metadata held `traceparent`
    /// and `tracestate`: a child of the caller's span, keeping the caller's
    /// sampling decision, or the root of a new trace when `traceparent` is
    /// absent or invalid (the state of an invalid parent is dropped with
    /// it, as the specification asks), sampled when `record_new` says
    /// spans are being exported.
    pub fn for_call(traceparent: Option<&str>, tracestate: Option<&str>, record_new: bool) -> Self {
        match traceparent.and_then(parse_traceparent) {
            Some((trace_id, parent, flags)) => Self {
                trace_id,
                span_id: new_span_id(),
                parent_span_id: Some(parent),
                flags,
                state: tracestate
                    .map(str::trim)
                    .filter(|state| !state.is_empty())
                    .map(str::to_owned),
            },
            None => Self {
                trace_id: loop {
                    let id =
                        (u128::from(crate::random::u64()) << 64) | u128::from(crate::random::u64());
                    if id != 0 {
                        break id;
                    }
                },
                span_id: new_span_id(),
                parent_span_id: None,
                flags: if record_new { SAMPLED } else { 0 },
                state: None,
            },
        }
    }

    /// Whether the trace is being recorded (its `sampled` flag).
    pub fn sampled(&self) -> bool {
        self.flags & SAMPLED != 0
    }

    pub fn parent_span_id(&self) -> Option<String> {
        self.parent_span_id.map(|id| format!("{id:016x}"))
    }

    pub fn trace_id(&self) -> String {
        format!("{:032x}", self.trace_id)
    }

    pub fn span_id(&self) -> String {
        format!("{:016x}", self.span_id)
    }

    /// The `traceparent` value naming this call's span as the parent.
    pub fn traceparent(&self) -> String {
        format!(
            "00-{}-{}-{:02x}",
            self.trace_id(),
            self.span_id(),
            self.flags
        )
    }

    pub fn tracestate(&self) -> Option<&str> {
        self.state.as_deref()
    }

    /// Runs `future` with this context as the current one.
    pub async fn scope<F: Future>(self, future: F) -> F::Output {
        CURRENT.scope(self, future).await
    }

    /// Runs `work` with this context as the current one, synchronously
    /// (for a stream polled outside the call's task).
    pub fn sync_scope<R>(self, work: impl FnOnce() -> R) -> R {
        CURRENT.sync_scope(self, work)
    }

    /// The context of the call being served, if any.
    pub fn current() -> Option<Self> {
        CURRENT.try_with(Clone::clone).ok()
    }
}

fn new_span_id() -> u64 {
    loop {
        let id = crate::random::u64();
        if id != 0 {
            return id;
        }
    }
}

/// Trace id, parent span id and flags of a valid `traceparent`. Versions
/// after 00 are read as 00 where their prefix matches, as the
/// specification asks of a version-00 reader; version ff is invalid.
fn parse_traceparent(value: &str) -> Option<(u128, u64, u8)> {
    let value = value.trim();
    let bytes = value.as_bytes();
    let version = value.get(0..2)?;
    let well_formed = match version {
        "00" => bytes.len() == 55,
        "ff" => false,
        _ => bytes.len() == 55 || (bytes.len() > 55 && bytes[55] == b'-'),
    };
    // ASCII first, so the slices below fall on character boundaries.
    if !well_formed
        || !bytes[..55].is_ascii()
        || bytes[2] != b'-'
        || bytes[35] != b'-'
        || bytes[52] != b'-'
    {
        return None;
    }
    let lower_hex = |text: &str| {
        text.bytes()
            .all(|byte| byte.is_ascii_digit() || (b'a'..=b'f').contains(&byte))
    };
    let (trace, parent, flags) = (&value[3..35], &value[36..52], &value[53..55]);
    if ![version, trace, parent, flags].into_iter().all(lower_hex) {
        return None;
    }
    let trace_id = u128::from_str_radix(trace, 16).ok()?;
    let parent_id = u64::from_str_radix(parent, 16).ok()?;
    let flags = u8::from_str_radix(flags, 16).ok()?;
    (trace_id != 0 && parent_id != 0).then_some((trace_id, parent_id, flags))
}

#[cfg(test)]
mod tests {
    use super::*;

    const PARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn a_valid_parent_is_continued_with_a_new_span() {
        let context = TraceContext::for_call(Some(PARENT), Some("rojo=00f067aa0ba902b7"), false);
        assert_eq!(context.trace_id(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_ne!(context.span_id(), "00f067aa0ba902b7");
        assert_eq!(
            context.parent_span_id().as_deref(),
            Some("00f067aa0ba902b7")
        );
        assert_eq!(context.tracestate(), Some("rojo=00f067aa0ba902b7"));
        assert!(context.sampled(), "the caller's decision");
        let header = context.traceparent();
        assert!(
            header.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-") && header.ends_with("-01"),
            "{header}"
        );
        assert_eq!(
            parse_traceparent(&header).map(|(_, _, flags)| flags),
            Some(1)
        );
    }

    #[test]
    fn invalid_parents_start_a_new_trace_and_drop_their_state() {
        for invalid in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00_4bf92f3577b34da6a3ce929d0e0e4736_00f067aa0ba902b7_01",
            "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0é",
            "01-4bf92f3577b34da6a3ce929d0e0e47é-00f067aa0ba902b7-01-é",
        ] {
            let context = TraceContext::for_call(Some(invalid), Some("rojo=1"), false);
            assert_ne!(
                context.trace_id(),
                "4bf92f3577b34da6a3ce929d0e0e4736",
                "{invalid:?}"
            );
            assert_eq!(context.tracestate(), None, "{invalid:?}");
            assert_eq!(context.parent_span_id(), None, "{invalid:?}");
            assert!(!context.sampled(), "nobody records it");
            assert!(parse_traceparent(&context.traceparent()).is_some());
        }
    }

    #[test]
    fn later_versions_are_read_by_their_version_00_prefix() {
        let future = "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-more";
        let context = TraceContext::for_call(Some(future), None, false);
        assert_eq!(context.trace_id(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert!(context.traceparent().starts_with("00-"), "we speak 00");
    }

    #[test]
    fn new_traces_are_sampled_when_spans_are_exported() {
        let recorded = TraceContext::for_call(None, None, true);
        assert!(recorded.sampled());
        assert!(recorded.traceparent().ends_with("-01"));
        let unsampled_parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00";
        assert!(
            !TraceContext::for_call(Some(unsampled_parent), None, true).sampled(),
            "a caller that does not record keeps its decision"
        );
    }

    #[tokio::test]
    async fn the_context_is_current_inside_its_scope_only() {
        assert_eq!(TraceContext::current(), None);
        let context = TraceContext::for_call(Some(PARENT), None, false);
        let inside = context
            .clone()
            .scope(async { TraceContext::current() })
            .await;
        assert_eq!(inside, Some(context));
    }
}
