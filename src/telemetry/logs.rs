//! Log lines over OTLP (issue 15 finding 3): every line the console log
//! keeps also goes to the collector as an OpenTelemetry log record, with the
//! trace and span it was written in, so Application Insights' `traces` table
//! has the lines outside any exported span too (a dependency that went
//! down, the reconciler's passes, start-up) and a payment's lines join its
//! trace by `operation_Id`. Lines from the OpenTelemetry crates themselves
//! stay on the console only: an exporter complaining about the collector
//! must not feed the collector.

use opentelemetry::logs::{AnyValue, LogRecord as _, Logger as _, LoggerProvider as _, Severity};
use opentelemetry::trace::TraceContextExt;
use opentelemetry_sdk::logs::{SdkLogger, SdkLoggerProvider};
use std::sync::OnceLock;
use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber, dispatcher::WeakDispatch};
use tracing_subscriber::{Layer, layer::Context, registry::LookupSpan};

/// The layer that hands each log line to the OTLP logger, when there is
/// one. Always in the subscriber (not as an `Option` layer, which would
/// not pass on `on_register_dispatch`).
pub struct LogBridge {
    logger: Option<SdkLogger>,
    /// The subscriber this layer is part of: the trace context of a span is
    /// read through it (`tracing_opentelemetry::get_otel_context`), as the
    /// dispatcher is not reachable from inside an event otherwise.
    dispatch: OnceLock<WeakDispatch>,
}

impl LogBridge {
    pub fn new(provider: Option<&SdkLoggerProvider>) -> LogBridge {
        LogBridge {
            logger: provider.map(|p| p.logger("rtpd")),
            dispatch: OnceLock::new(),
        }
    }

    /// The trace context of the innermost span around the event that has one.
    fn trace_context<S>(&self, ctx: &Context<'_, S>) -> Option<opentelemetry::trace::SpanContext>
    where
        S: Subscriber + for<'a> LookupSpan<'a>,
    {
        let dispatch = self.dispatch.get()?.upgrade()?;
        // The current span whatever this layer's filter (the log level may
        // leave rtpd's INFO spans out of it), and its parents as the
        // registry itself knows them. Ids first: no span of the registry is
        // held while a context is read.
        let current = ctx.current_span().id()?.clone();
        let registry = dispatch.downcast_ref::<tracing_subscriber::Registry>()?;
        let ids: Vec<_> = registry.span(&current)?.scope().map(|s| s.id()).collect();
        ids.iter().find_map(|id| {
            let cx = tracing_opentelemetry::get_otel_context(id, &dispatch)?;
            let sc = cx.span().span_context().clone();
            sc.is_valid().then_some(sc)
        })
    }
}

impl<S> Layer<S> for LogBridge
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_register_dispatch(&self, subscriber: &tracing::Dispatch) {
        let _ = self.dispatch.set(subscriber.downgrade());
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        let Some(logger) = &self.logger else {
            return;
        };
        let meta = event.metadata();
        if meta.target().starts_with("opentelemetry") {
            return;
        }
        let mut fields = Fields::default();
        event.record(&mut fields);
        let mut record = logger.create_log_record();
        record.set_target(meta.target().to_owned());
        record.set_severity_number(severity(*meta.level()));
        record.set_severity_text(meta.level().as_str());
        record.set_body(AnyValue::from(fields.message.unwrap_or_default()));
        record.add_attributes(fields.attributes);
        if let Some(sc) = self.trace_context(&ctx) {
            record.set_trace_context(sc.trace_id(), sc.span_id(), Some(sc.trace_flags()));
        }
        logger.emit(record);
    }
}

fn severity(level: Level) -> Severity {
    match level {
        Level::ERROR => Severity::Error,
        Level::WARN => Severity::Warn,
        Level::INFO => Severity::Info,
        Level::DEBUG => Severity::Debug,
        Level::TRACE => Severity::Trace,
    }
}

/// An event's `message` (the record's body) and its other fields
/// (attributes, as the console's JSON log names them).
#[derive(Default)]
struct Fields {
    message: Option<String>,
    attributes: Vec<(&'static str, AnyValue)>,
}

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.put(field, AnyValue::from(value.to_owned()));
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.put(field, AnyValue::from(value));
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.put(
            field,
            i64::try_from(value).map_or_else(|_| AnyValue::from(value.to_string()), AnyValue::from),
        );
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        self.put(field, AnyValue::from(value));
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.put(field, AnyValue::from(value));
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.put(field, AnyValue::from(format!("{value:?}")));
    }
}

impl Fields {
    fn put(&mut self, field: &Field, value: AnyValue) {
        if field.name() == "message" {
            self.message = Some(match value {
                AnyValue::String(s) => s.to_string(),
                other => format!("{other:?}"),
            });
        } else {
            self.attributes.push((field.name(), value));
        }
    }
}
