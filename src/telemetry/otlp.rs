//! The OTLP exporters: traces and metrics, off unless an endpoint is given
//! (the standard `OTEL_EXPORTER_OTLP_*` variables, or `rtpd dev --otlp URL`).
//!
//! Export never blocks a request: spans go through the SDK's batch processor,
//! whose queue is bounded (`OTEL_BSP_MAX_QUEUE_SIZE`, 2048 by default) and
//! drops what does not fit, on its own thread; metrics are read every
//! `OTEL_METRIC_EXPORT_INTERVAL` (60 s by default) by the periodic reader,
//! also on its own thread. A dead collector costs at most one full queue.
//!
//! While exports fail ([`FAILURES_BEFORE_PAUSE`] in a row: one refused
//! batch is not an outage), rtpd stops exporting spans ([`ExportHealth`],
//! [`WhileExportsWork`]): they would be dropped anyway. They are still
//! made and sampled as usual, so trace context keeps travelling (WAL
//! records, messages and downstream calls carry their `traceparent`) and
//! the logs keep their trace ids. Meanwhile a probe thread sends an empty export every [`PROBE_EVERY`];
//! the first that the collector accepts turns recording back on. The probe
//! does not depend on traffic, so tracing resumes within one probe interval
//! of the collector's return, whatever the request pattern.
//!
//! Every export carries `service.instance.id` (the replica's or host's name
//! and a uuid of this process), so replicas do not collide
//! ([`instance_id`]).

use opentelemetry::KeyValue;
use opentelemetry_otlp::{LogExporter, MetricExporter, SpanExporter, WithExportConfig};
use opentelemetry_sdk::{
    Resource,
    error::OTelSdkResult,
    logs::SdkLoggerProvider,
    metrics::{PeriodicReader, SdkMeterProvider},
    trace::{BatchSpanProcessor, SdkTracerProvider, SpanData, SpanProcessor},
};
use std::sync::{
    Arc,
    atomic::{AtomicU32, Ordering},
    mpsc,
};
use std::time::Duration;

const ENDPOINT: &str = "OTEL_EXPORTER_OTLP_ENDPOINT";
const TRACES_ENDPOINT: &str = "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT";
const METRICS_ENDPOINT: &str = "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT";
const LOGS_ENDPOINT: &str = "OTEL_EXPORTER_OTLP_LOGS_ENDPOINT";
const PROTOCOL_VARS: [&str; 4] = [
    "OTEL_EXPORTER_OTLP_PROTOCOL",
    "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
    "OTEL_EXPORTER_OTLP_METRICS_PROTOCOL",
    "OTEL_EXPORTER_OTLP_LOGS_PROTOCOL",
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

/// How often, while span exports fail, an empty export asks the collector
/// whether it is back. An empty request costs the collector nothing and
/// rtpd one small POST (or gRPC call) per interval, during an outage only.
pub const PROBE_EVERY: Duration = Duration::from_secs(2);

/// How many span exports in a row must fail before rtpd stops recording
/// spans: one refused batch (a 400 or 413 from a collector that is up) is
/// not an outage, and must not stop tracing.
pub const FAILURES_BEFORE_PAUSE: u32 = 3;

/// Whether span exports reach the collector; shared by the exporter (which
/// reports) and the tracing filter (which asks).
#[derive(Debug, Default)]
pub struct ExportHealth {
    /// Span exports failed in a row.
    failures: AtomicU32,
}

impl ExportHealth {
    fn report(&self, ok: bool) {
        if ok {
            if self.failures.swap(0, Ordering::Relaxed) >= FAILURES_BEFORE_PAUSE {
                tracing::warn!("OTLP span export works again; recording spans");
            }
            return;
        }
        let failed = self
            .failures
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                Some(n.saturating_add(1))
            })
            .unwrap_or(u32::MAX)
            .saturating_add(1);
        if failed == FAILURES_BEFORE_PAUSE {
            tracing::warn!(
                failures = failed,
                probe_every_secs = PROBE_EVERY.as_secs(),
                "OTLP span exports keep failing; spans are not recorded until the collector answers again"
            );
        }
    }

    /// Whether new spans should be recorded now.
    pub fn recording(&self) -> bool {
        self.failures.load(Ordering::Relaxed) < FAILURES_BEFORE_PAUSE
    }
}

/// Starts the probe thread: while `health` says exports fail, it sends an
/// empty export through `exporter` every [`PROBE_EVERY`] and reports the
/// result. It ends when the returned sender is dropped. A plain thread, as
/// the batch processor's: the blocking HTTP client must not run on the
/// Tokio runtime, and the gRPC channel's worker is already on it.
fn start_probe(
    exporter: SpanExporter,
    health: Arc<ExportHealth>,
) -> Result<mpsc::Sender<()>, OtlpError> {
    use opentelemetry_sdk::trace::SpanExporter as _;
    let (stop, stopped) = mpsc::channel::<()>();
    std::thread::Builder::new()
        .name("otlp-probe".into())
        .spawn(move || {
            while let Err(mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(PROBE_EVERY) {
                if !health.recording() {
                    let ok = futures::executor::block_on(exporter.export(Vec::new())).is_ok();
                    health.report(ok);
                }
            }
        })
        .map_err(|e| OtlpError::Build(format!("probe thread: {e}")))?;
    Ok(stop)
}

/// Hands finished spans to the batch processor while span exports work,
/// and drops them while they fail (issue 15 finding 2). Spans are still
/// made and sampled as the operator's sampler (`OTEL_TRACES_SAMPLER`)
/// decides, so trace context — and its sampled flag — travels unchanged to
/// WAL records, messages and downstream calls during a collector outage
/// (before, no span was made then and nothing carried a `traceparent`;
/// a first fix made the spans unsampled, which turned the flag off for the
/// downstream's own sampling and for retries long after the outage — a
/// reviewer's finding).
#[derive(Debug)]
struct WhileExportsWork {
    inner: BatchSpanProcessor,
    health: Arc<ExportHealth>,
}

impl SpanProcessor for WhileExportsWork {
    fn on_start(&self, span: &mut opentelemetry_sdk::trace::Span, cx: &opentelemetry::Context) {
        self.inner.on_start(span, cx);
    }

    fn on_end(&self, span: SpanData) {
        if self.health.recording() {
            self.inner.on_end(span);
        }
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

/// The OTLP span exporter, reporting each export's result to [`ExportHealth`].
#[derive(Debug)]
struct HealthReporting {
    inner: SpanExporter,
    health: Arc<ExportHealth>,
}

impl opentelemetry_sdk::trace::SpanExporter for HealthReporting {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let result = self.inner.export(batch).await;
        self.health.report(result.is_ok());
        result
    }

    fn shutdown_with_timeout(&self, timeout: std::time::Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

/// Where to export, when it is not the environment's business.
#[derive(Debug, Clone, Default)]
pub struct OtlpOverride {
    /// OTLP/HTTP base URL (`http://127.0.0.1:4318`): `/v1/traces`,
    /// `/v1/metrics` and `/v1/logs` are appended, as for
    /// `OTEL_EXPORTER_OTLP_ENDPOINT`.
    pub endpoint: Option<String>,
}

/// The providers that are running; dropping them does not flush, `shutdown` does.
pub struct Exporters {
    pub tracer: Option<SdkTracerProvider>,
    pub meter: Option<SdkMeterProvider>,
    /// The log lines, with the trace and span they were written in.
    pub logger: Option<SdkLoggerProvider>,
    pub health: Arc<ExportHealth>,
    /// Dropping it stops the probe thread.
    pub probe: Option<mpsc::Sender<()>>,
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

/// Which signals the configuration asks to export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Wanted {
    pub traces: bool,
    pub metrics: bool,
    pub logs: bool,
}

/// Which signals the configuration asks to export: all three with
/// `OTEL_EXPORTER_OTLP_ENDPOINT` (or `--otlp`), each with its own
/// `..._TRACES_`, `..._METRICS_`, `..._LOGS_ENDPOINT`.
pub fn wanted(over: &OtlpOverride) -> Wanted {
    if env(SDK_DISABLED).is_some_and(|v| v.trim().eq_ignore_ascii_case("true")) {
        return Wanted {
            traces: false,
            metrics: false,
            logs: false,
        };
    }
    let all = over.endpoint.is_some() || env(ENDPOINT).is_some();
    Wanted {
        traces: all || env(TRACES_ENDPOINT).is_some(),
        metrics: all || env(METRICS_ENDPOINT).is_some(),
        logs: all || env(LOGS_ENDPOINT).is_some(),
    }
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

/// This process's `service.instance.id`: the replica's name (Container
/// Apps' `CONTAINER_APP_REPLICA_NAME`), else the host name, then a uuid
/// made at start-up, so two processes never share one — not two replicas,
/// not a restart of the same one. Application Insights shows it as
/// `cloud_RoleInstance`.
pub fn instance_id() -> String {
    static ID: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    ID.get_or_init(|| format!("{}-{}", host_name(), uuid::Uuid::new_v4().simple()))
        .clone()
}

fn host_name() -> String {
    env("CONTAINER_APP_REPLICA_NAME")
        .or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|h| h.trim().to_owned())
                .filter(|h| !h.is_empty())
        })
        .or_else(|| env("HOSTNAME"))
        .unwrap_or_else(|| "unknown-host".into())
}

fn resource() -> Resource {
    // The builder reads OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES itself;
    // what is added here yields to them.
    let given = |key: &str| {
        env("OTEL_RESOURCE_ATTRIBUTES").is_some_and(|a| {
            a.split(',')
                .any(|kv| kv.split('=').next().map(str::trim) == Some(key))
        })
    };
    let mut r = Resource::builder();
    // An unset service name would otherwise be "unknown_service".
    if env("OTEL_SERVICE_NAME").is_none() && !given("service.name") {
        r = r.with_service_name(DEFAULT_SERVICE_NAME);
    }
    if !given("service.instance.id") {
        r = r.with_attribute(KeyValue::new("service.instance.id", instance_id()));
    }
    if !given("host.name") {
        r = r.with_attribute(KeyValue::new("host.name", host_name()));
    }
    r.build()
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

fn log_exporter(over: &OtlpOverride) -> Result<LogExporter, OtlpError> {
    let built = match &over.endpoint {
        Some(base) => LogExporter::builder()
            .with_http()
            .with_endpoint(with_path(base, "v1/logs"))
            .build(),
        None => LogExporter::builder().build(),
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
    let Wanted {
        traces,
        metrics,
        logs,
    } = wanted(over);
    let health = Arc::new(ExportHealth::default());
    if !traces && !metrics && !logs {
        return Ok(Exporters {
            tracer: None,
            meter: None,
            logger: None,
            health,
            probe: None,
        });
    }
    check_protocols()?;
    let resource = resource();
    let (tracer, probe) = if traces {
        let exporter = HealthReporting {
            inner: span_exporter(over)?,
            health: health.clone(),
        };
        let probe = start_probe(span_exporter(over)?, health.clone())?;
        let batch = WhileExportsWork {
            inner: BatchSpanProcessor::builder(exporter).build(),
            health: health.clone(),
        };
        let provider = SdkTracerProvider::builder()
            .with_span_processor(batch)
            .with_resource(resource.clone())
            .build();
        (Some(provider), Some(probe))
    } else {
        (None, None)
    };
    let meter = if metrics {
        let reader = PeriodicReader::builder(metric_exporter(over)?).build();
        Some(
            SdkMeterProvider::builder()
                .with_reader(reader)
                .with_resource(resource.clone())
                .build(),
        )
    } else {
        None
    };
    // Log lines go through the SDK's batch processor too (bounded queue,
    // `OTEL_BLRP_MAX_QUEUE_SIZE`, its own thread): a dead collector drops
    // them and never holds up the line on the console.
    let logger = if logs {
        Some(
            SdkLoggerProvider::builder()
                .with_batch_exporter(log_exporter(over)?)
                .with_resource(resource)
                .build(),
        )
    } else {
        None
    };
    Ok(Exporters {
        tracer,
        meter,
        logger,
        health,
        probe,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exports_failing_in_a_row_stop_recording_and_a_success_resumes_it() {
        let h = ExportHealth::default();
        assert!(h.recording());
        // One refused batch (a 413, say) from a collector that is up.
        h.report(false);
        assert!(h.recording(), "one failed export is not an outage");
        h.report(true);
        for _ in 1..FAILURES_BEFORE_PAUSE {
            h.report(false);
        }
        assert!(h.recording(), "a success in between starts the count again");
        h.report(false);
        assert!(
            !h.recording(),
            "{FAILURES_BEFORE_PAUSE} in a row: an outage"
        );
        // The probe keeps failing during the outage.
        h.report(false);
        assert!(!h.recording());
        h.report(true);
        assert!(h.recording());
    }

    #[test]
    fn an_instance_id_is_the_host_and_a_uuid_of_this_process() {
        let id = instance_id();
        let (host, uuid) = id.rsplit_once('-').unwrap();
        assert_eq!(host, host_name());
        assert_eq!(uuid.len(), 32, "{id}");
        assert_eq!(instance_id(), id, "one per process");
    }

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
