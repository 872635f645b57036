//! W3C trace context across process boundaries: read from an incoming
//! `traceparent`, written into queue messages, WAL records and downstream
//! calls. A wire-format concern like [`crate::envelope`], so it sits low and
//! imports nothing of rtpd; the exporters are in [`crate::telemetry`].
//!
//! With no exporter configured, spans carry no OpenTelemetry context and
//! nothing is propagated: `current_traceparent` is `None`.

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{SpanContext, TraceContextExt};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use std::collections::HashMap;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The header and message property name of W3C trace context.
pub const TRACEPARENT: &str = "traceparent";

/// The `traceparent` of the current span, if it has a valid context.
pub fn current_traceparent() -> Option<String> {
    traceparent_of(&tracing::Span::current())
}

/// The `traceparent` of `span`, if it has a valid context.
pub fn traceparent_of(span: &tracing::Span) -> Option<String> {
    let cx = span.context();
    if !cx.span().span_context().is_valid() {
        return None;
    }
    let mut carrier = HashMap::new();
    TraceContextPropagator::new().inject_context(&cx, &mut carrier);
    carrier.remove(TRACEPARENT)
}

/// Parses a `traceparent` value into the context it names.
pub fn parse(traceparent: &str) -> Option<opentelemetry::Context> {
    let carrier = HashMap::from([(TRACEPARENT.to_owned(), traceparent.to_owned())]);
    let cx = TraceContextPropagator::new().extract(&carrier);
    cx.span().span_context().is_valid().then_some(cx)
}

/// The span context a `traceparent` names (for links).
pub fn span_context(traceparent: &str) -> Option<SpanContext> {
    parse(traceparent).map(|cx| cx.span().span_context().clone())
}

/// Makes `span` a child of the remote span `traceparent` names; an invalid or
/// absent value leaves `span` where it is.
pub fn continue_from(span: &tracing::Span, traceparent: Option<&str>) {
    if let Some(cx) = traceparent.and_then(parse) {
        let _ = span.set_parent(cx);
    }
}

/// Links `span` to the span an untrusted caller's `traceparent` names, and
/// records that trace id as `vendor.trace_id` (a field `span` declares);
/// `span` stays the root of a trace of its own, so neither the caller's
/// trace id nor its sampled flag carries over.
pub fn link_untrusted(span: &tracing::Span, traceparent: Option<&str>) {
    if let Some(sc) = traceparent.and_then(span_context) {
        span.record("vendor.trace_id", sc.trace_id().to_string().as_str());
        span.add_link(sc);
    }
}

/// Links `span` to the span `traceparent` names (a replay to its original
/// trace, a WAL flush to the requests it carried).
pub fn link_to(span: &tracing::Span, traceparent: Option<&str>) {
    if let Some(sc) = traceparent.and_then(span_context) {
        span.add_link(sc);
    }
}

/// Links `span` to `other` (a WAL flush to each request it carried).
pub fn link_spans(span: &tracing::Span, other: &tracing::Span) {
    let cx = other.context();
    let sc = cx.span().span_context().clone();
    if sc.is_valid() {
        span.add_link(sc);
    }
}

/// The trace id (32 hex digits) of a `traceparent` value.
pub fn trace_id(traceparent: &str) -> Option<String> {
    span_context(traceparent).map(|sc| sc.trace_id().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_traceparent_parses_to_its_trace_id_and_garbage_does_not() {
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        assert_eq!(
            trace_id(tp).as_deref(),
            Some("4bf92f3577b34da6a3ce929d0e0e4736")
        );
        assert_eq!(trace_id("00-zz-00f067aa0ba902b7-01"), None);
        assert_eq!(
            trace_id("00-00000000000000000000000000000000-00f067aa0ba902b7-01"),
            None
        );
    }

    #[test]
    fn without_an_exporter_nothing_is_propagated() {
        let span = tracing::info_span!("no subscriber");
        assert_eq!(traceparent_of(&span), None);
    }
}
