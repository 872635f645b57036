//! Logging: human-readable by default, JSON with `RTPD_LOG_FORMAT=json`.
//! Payloads are never logged; lines about a transaction carry its id.

use crate::config::LogFormat;
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::{
    EnvFilter, filter::filter_fn, fmt, layer::Context, prelude::*, registry::LookupSpan,
};

/// actix's HTTP/1 dispatcher logs a client's malformed request or body
/// (bad header bytes, a broken chunked body, Content-Length with
/// Transfer-Encoding) at ERROR, so anyone could write ERROR lines. Those
/// lines are kept out of the log and counted instead
/// (`rtpd_http_protocol_errors`); `RTPD_LOG_LEVEL=debug` shows them.
const ACTIX_DISPATCHER: &str = "actix_http::h1::dispatcher";

struct ProtocolErrors;

impl<S: Subscriber + for<'a> LookupSpan<'a>> tracing_subscriber::Layer<S> for ProtocolErrors {
    fn on_event(&self, _event: &Event<'_>, _ctx: Context<'_, S>) {
        crate::metrics::http_protocol_error();
    }
}

pub fn init(format: LogFormat, level: &str) {
    let quiet_dispatcher = if matches!(level, "debug" | "trace") {
        ""
    } else {
        ",actix_http::h1::dispatcher=off"
    };
    let filter = EnvFilter::try_new(format!(
        "{level},actix_server=warn,actix_web=warn,hyper=warn,reqwest=warn{quiet_dispatcher}"
    ))
    .unwrap_or_else(|_| EnvFilter::new("info"));
    let counter = ProtocolErrors.with_filter(filter_fn(|m| {
        m.target() == ACTIX_DISPATCHER && *m.level() == Level::ERROR
    }));
    // The filter is the log's, per layer, so the counter still sees what
    // the log leaves out.
    let registry = tracing_subscriber::registry().with(counter);
    let result = match format {
        LogFormat::Json => registry
            .with(
                fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_current_span(true)
                    .with_span_list(false)
                    .with_filter(filter),
            )
            .try_init(),
        LogFormat::Text => registry
            .with(fmt::layer().with_target(false).with_filter(filter))
            .try_init(),
    };
    // A second init (tests) keeps the first subscriber.
    let _ = result;
}
