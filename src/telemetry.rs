//! Logging: human-readable by default, JSON with `RTPD_LOG_FORMAT=json`.
//! Payloads are never logged; lines about a transaction carry its id.

use crate::config::LogFormat;
use tracing_subscriber::{EnvFilter, fmt, prelude::*};

pub fn init(format: LogFormat, level: &str) {
    let filter = EnvFilter::try_new(format!(
        "{level},actix_server=warn,actix_web=warn,hyper=warn,reqwest=warn"
    ))
    .unwrap_or_else(|_| EnvFilter::new("info"));
    let registry = tracing_subscriber::registry().with(filter);
    let result = match format {
        LogFormat::Json => registry
            .with(
                fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_current_span(true)
                    .with_span_list(false),
            )
            .try_init(),
        LogFormat::Text => registry.with(fmt::layer().with_target(false)).try_init(),
    };
    // A second init (tests) keeps the first subscriber.
    let _ = result;
}
