//! The OTLP exporters: traces and metrics, off unless an endpoint is given
//! (the standard `OTEL_EXPORTER_OTLP_*` variables, or `rtpd dev --otlp URL`).
//!
//! Export never blocks a request: spans go through the SDK's batch processor,
//! whose queue is bounded (`OTEL_BSP_MAX_QUEUE_SIZE`, 2048 by default) and
//! drops what does not fit, on its own thread; metrics are read every
//! `OTEL_METRIC_EXPORT_INTERVAL` (60 s by default) by the periodic reader,
//! also on its own thread. A dead collector costs at most one full queue.

use opentelemetry_otlp::{MetricExporter, SpanExporter, WithExportConfig};
use opentelemetry_sdk::{
    Resource,
    metrics::{PeriodicReader, SdkMeterProvider},
    trace::{BatchSpanProcessor, SdkTracerProvider},
};

const ENDPOINT: &str = "OTEL_EXPORTER_OTLP_ENDPOINT";
const TRACES_ENDPOINT: &str = "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT";
const METRICS_ENDPOINT: &str = "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT";
const PROTOCOL_VARS: [&str; 3] = [
    "OTEL_EXPORTER_OTLP_PROTOCOL",
    "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
    "OTEL_EXPORTER_OTLP_METRICS_PROTOCOL",
];
const SDK_DISABLED: &str = "OTEL_SDK_DISABLED";
/// The service name when `OTEL_SERVICE_NAME` does not say otherwise.
pub const DEFAULT_SERVICE_NAME: &str = "rtpd";

/// Why the exporters could not be set up; names the variable at fault.
#[derive(Debug, thiserror::Error)]
pub enum OtlpError {
    #[error("{var}: {message}")]
    Invalid { var: &'static str, message: String },
    #[error("OTLP exporter: {0}")]
    Build(String),
}

/// Where to export, when it is not the environment's business.
#[derive(Debug, Clone, Default)]
pub struct OtlpOverride {
    /// OTLP/HTTP base URL (`http://127.0.0.1:4318`): `/v1/traces` and
    /// `/v1/metrics` are appended, as for `OTEL_EXPORTER_OTLP_ENDPOINT`.
    pub endpoint: Option<String>,
}

/// The providers that are running; dropping them does not flush, `shutdown` does.
pub struct Exporters {
    pub tracer: Option<SdkTracerProvider>,
    pub meter: Option<SdkMeterProvider>,
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

/// Which signals the configuration asks to export.
pub fn wanted(over: &OtlpOverride) -> (bool, bool) {
    if env(SDK_DISABLED).is_some_and(|v| v.trim().eq_ignore_ascii_case("true")) {
        return (false, false);
    }
    let all = over.endpoint.is_some() || env(ENDPOINT).is_some();
    (
        all || env(TRACES_ENDPOINT).is_some(),
        all || env(METRICS_ENDPOINT).is_some(),
    )
}

/// Refuses protocol values this build cannot speak, naming the variable
/// (the SDK alone would silently fall back to another protocol).
fn check_protocols() -> Result<(), OtlpError> {
    for var in PROTOCOL_VARS {
        if let Some(v) = env(var)
            && !matches!(v.trim(), "grpc" | "http/protobuf")
        {
            return Err(OtlpError::Invalid {
                var,
                message: format!("{v:?} is not supported; use grpc or http/protobuf"),
            });
        }
    }
    Ok(())
}

fn resource() -> Resource {
    // The builder reads OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES itself;
    // an unset service name would otherwise be "unknown_service".
    let r = Resource::builder().build();
    let named = env("OTEL_SERVICE_NAME").is_some()
        || env("OTEL_RESOURCE_ATTRIBUTES").is_some_and(|a| a.contains("service.name="));
    if named {
        r
    } else {
        Resource::builder()
            .with_service_name(DEFAULT_SERVICE_NAME)
            .build()
    }
}

/// `OTEL_METRIC_EXPORT_INTERVAL` (milliseconds; 60 s when unset), which the
/// periodic reader follows; gauges fed by polling should be read as often.
pub fn metric_export_interval() -> std::time::Duration {
    env("OTEL_METRIC_EXPORT_INTERVAL")
        .and_then(|v| v.trim().parse::<u64>().ok())
        .filter(|ms| *ms > 0)
        .map(std::time::Duration::from_millis)
        .unwrap_or(std::time::Duration::from_secs(60))
}

fn with_path(base: &str, path: &str) -> String {
    format!("{}/{path}", base.trim_end_matches('/'))
}

fn span_exporter(over: &OtlpOverride) -> Result<SpanExporter, OtlpError> {
    let built = match &over.endpoint {
        Some(base) => SpanExporter::builder()
            .with_http()
            .with_endpoint(with_path(base, "v1/traces"))
            .build(),
        None => SpanExporter::builder().build(),
    };
    built.map_err(|e| OtlpError::Build(e.to_string()))
}

fn metric_exporter(over: &OtlpOverride) -> Result<MetricExporter, OtlpError> {
    let built = match &over.endpoint {
        Some(base) => MetricExporter::builder()
            .with_http()
            .with_endpoint(with_path(base, "v1/metrics"))
            .build(),
        None => MetricExporter::builder().build(),
    };
    built.map_err(|e| OtlpError::Build(e.to_string()))
}

/// Builds the exporters the configuration asks for (none when no endpoint is
/// set). Must run inside the Tokio runtime: the gRPC transport needs it.
pub fn start(over: &OtlpOverride) -> Result<Exporters, OtlpError> {
    let (traces, metrics) = wanted(over);
    if !traces && !metrics {
        return Ok(Exporters {
            tracer: None,
            meter: None,
        });
    }
    check_protocols()?;
    let resource = resource();
    let tracer = if traces {
        let batch = BatchSpanProcessor::builder(span_exporter(over)?).build();
        Some(
            SdkTracerProvider::builder()
                .with_span_processor(batch)
                .with_resource(resource.clone())
                .build(),
        )
    } else {
        None
    };
    let meter = if metrics {
        let reader = PeriodicReader::builder(metric_exporter(over)?).build();
        Some(
            SdkMeterProvider::builder()
                .with_reader(reader)
                .with_resource(resource)
                .build(),
        )
    } else {
        None
    };
    Ok(Exporters { tracer, meter })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_paths_are_appended_once() {
        assert_eq!(
            with_path("http://h:4318/", "v1/traces"),
            "http://h:4318/v1/traces"
        );
        assert_eq!(
            with_path("http://h:4318", "v1/metrics"),
            "http://h:4318/v1/metrics"
        );
    }
}
