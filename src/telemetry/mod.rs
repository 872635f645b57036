//! Logs, traces and metrics export. Logging: human-readable by default, JSON
//! with `RTPD_LOG_FORMAT=json`. Payloads are never logged; lines about a
//! transaction carry its id. Traces, metrics and the log lines go out over
//! OTLP when the standard `OTEL_EXPORTER_OTLP_*` variables (or `rtpd dev
//! --otlp`) say where ([`otlp`], [`logs`]); trace context crosses processes as W3C `traceparent`
//! ([`crate::trace_context`]); ledger and queue calls are traced by the
//! decorators in [`ports`].

pub mod logs;
pub mod otlp;
pub mod ports;

use crate::config::LogFormat;
use opentelemetry::trace::TracerProvider as _;
use otlp::Exporters;
pub use otlp::{OtlpError, OtlpOverride};
use std::time::Duration;
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::{
    EnvFilter, Layer,
    filter::{self, Targets},
    fmt,
    layer::Context,
    prelude::*,
    registry::LookupSpan,
};

/// actix's HTTP/1 dispatcher logs a client's malformed request or body
/// (bad header bytes, a broken chunked body, Content-Length with
/// Transfer-Encoding) at ERROR, so anyone could write ERROR lines. Those
/// lines are kept out of the log and counted instead
/// (`rtpd_http_protocol_errors`); `RTPD_LOG_LEVEL=debug` shows them.
const ACTIX_DISPATCHER: &str = "actix_http::h1::dispatcher";

struct ProtocolErrors;

impl<S: Subscriber + for<'a> LookupSpan<'a>> Layer<S> for ProtocolErrors {
    fn on_event(&self, _event: &Event<'_>, _ctx: Context<'_, S>) {
        crate::metrics::http_protocol_error();
    }
}

/// How long the final flush may hold the exit, traces and metrics together.
pub const SHUTDOWN_FLUSH: Duration = Duration::from_secs(2);

/// The running exporters; call [`Telemetry::shutdown`] before exiting so the
/// last spans and metrics leave.
pub struct Telemetry {
    exporters: otlp::Exporters,
}

impl Telemetry {
    /// Whether spans are exported.
    pub fn traces(&self) -> bool {
        self.exporters.tracer.is_some()
    }

    /// Flushes and stops the exporters, waiting [`SHUTDOWN_FLUSH`] at most
    /// in all: traces and metrics flush at once, each on a thread of its
    /// own, and whatever has not left by then is dropped with the process.
    /// (The SDK's own timeouts are per provider and do not cover an export
    /// already stuck on a collector that accepts and never answers.)
    pub fn shutdown(self) {
        let Exporters {
            tracer,
            meter,
            logger,
            probe,
            ..
        } = self.exporters;
        drop(probe);
        let deadline = std::time::Instant::now() + SHUTDOWN_FLUSH;
        let (done, finished) = std::sync::mpsc::channel::<()>();
        let mut flushing = 0;
        let mut flush = |f: Box<dyn FnOnce() + Send>| {
            let done = done.clone();
            let spawned = std::thread::Builder::new()
                .name("otlp-shutdown".into())
                .spawn(move || {
                    f();
                    let _ = done.send(());
                });
            if spawned.is_ok() {
                flushing += 1;
            }
        };
        if let Some(t) = tracer {
            flush(Box::new(move || {
                let _ = t.shutdown_with_timeout(SHUTDOWN_FLUSH);
            }));
        }
        if let Some(m) = meter {
            flush(Box::new(move || {
                let _ = m.shutdown_with_timeout(SHUTDOWN_FLUSH);
            }));
        }
        if let Some(l) = logger {
            flush(Box::new(move || {
                let _ = l.shutdown_with_timeout(SHUTDOWN_FLUSH);
            }));
        }
        for _ in 0..flushing {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if finished.recv_timeout(left).is_err() {
                tracing::warn!(
                    after_secs = SHUTDOWN_FLUSH.as_secs(),
                    "OTLP flush on shutdown did not finish; the last spans and metrics are dropped"
                );
                return;
            }
        }
    }
}

fn otel_layer<S>(exporters: &otlp::Exporters) -> impl Layer<S>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    // rtpd's own spans at info, whatever RTPD_LOG_LEVEL keeps out of the
    // logs: a quiet log must not cost the traces. With no exporter the
    // filter enables nothing: an unfiltered `None` layer would ask for every
    // span, and the spans would be made and entered for nobody.
    let spans = if exporters.tracer.is_some() {
        Targets::new()
            .with_default(Level::WARN)
            .with_target("rtp_durability", Level::INFO)
    } else {
        Targets::new()
    };
    // While the collector fails, finished spans are dropped before the
    // batch queue (see otlp::WhileExportsWork); their context travels.
    exporters
        .tracer
        .as_ref()
        .map(|p| {
            tracing_opentelemetry::layer()
                .with_tracer(p.tracer("rtpd"))
                .with_location(false)
                .with_threads(false)
                .with_tracked_inactivity(false)
                // Nothing reads OpenTelemetry's own current context (trace
                // context is taken from the tracing span), so entering a span on
                // every poll need not attach one.
                .with_context_activation(false)
        })
        .with_filter(spans)
}

/// Sets up logging, and the OTLP exporters when configured. Must run inside
/// the Tokio runtime. A second call (tests) keeps the first subscriber.
pub fn init(format: LogFormat, level: &str, over: &OtlpOverride) -> Result<Telemetry, OtlpError> {
    let exporters = otlp::start(over)?;
    if let Some(m) = &exporters.meter {
        opentelemetry::global::set_meter_provider(m.clone());
        crate::metrics::export_over_otlp();
    }
    let quiet_dispatcher = if matches!(level, "debug" | "trace") {
        ""
    } else {
        ",actix_http::h1::dispatcher=off"
    };
    let directives = format!(
        "{level},actix_server=warn,actix_web=warn,hyper=warn,reqwest=warn,h2=warn,tonic=warn,opentelemetry=warn{quiet_dispatcher}"
    );
    let log_filter = || EnvFilter::try_new(&directives).unwrap_or_else(|_| EnvFilter::new("info"));
    let filter = log_filter();
    // The same lines as the console log, over OTLP.
    let exported_logs = logs::LogBridge::new(exporters.logger.as_ref()).with_filter(log_filter());
    // The filter is the log's, per layer, so the counter still sees what
    // the log leaves out.
    let counter = ProtocolErrors.with_filter(filter::filter_fn(|m| {
        m.target() == ACTIX_DISPATCHER && *m.level() == Level::ERROR
    }));
    let registry = tracing_subscriber::registry()
        .with(counter)
        .with(otel_layer(&exporters))
        .with(exported_logs);
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
            .with(
                fmt::layer()
                    .with_target(false)
                    // Colours only on a terminal: in a log file or a
                    // container's log stream the escapes hid the level from
                    // a search for "ERROR" (the fault campaign's own count).
                    .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
                    .with_filter(filter),
            )
            .try_init(),
    };
    let _ = result;
    Ok(Telemetry { exporters })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// With OTLP off and a quiet log, rtpd's info spans (one per request,
    /// ledger call, attempt...) must not be created at all: each costs a
    /// registry slot and an enter/exit on every poll.
    #[tokio::test]
    async fn with_export_off_a_quiet_log_creates_no_spans() {
        let telemetry = init(LogFormat::Text, "warn", &OtlpOverride::default()).unwrap();
        assert!(!telemetry.traces());
        let span = tracing::info_span!("probe");
        assert!(
            span.is_disabled(),
            "an info span was created with the log at warn and no exporter"
        );
        let warned = tracing::warn_span!("probe");
        assert!(
            !warned.is_disabled(),
            "a warn span is kept with the log at warn"
        );
    }
}
