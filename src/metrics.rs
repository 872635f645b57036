//! Process metrics (Prometheus text via `prometheus-client`). Names live here
//! and only here; labels have few distinct values. Every notable occurrence
//! bumps one metric through a function of this module.

use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};
use std::{
    sync::{OnceLock, atomic::AtomicU64},
    time::Duration,
};

use crate::ledger::Counts;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CodeLabel {
    code: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LogLabel {
    log: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DependencyLabel {
    dependency: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabel {
    state: &'static str,
}

fn latency_buckets() -> impl Iterator<Item = f64> {
    [
        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    ]
    .into_iter()
}

struct Metrics {
    registry: Registry,
    ingest_requests: Family<CodeLabel, Counter>,
    ingest_seconds: Histogram,
    wal_flush_seconds: Family<LogLabel, Histogram>,
    wal_flush_records: Family<LogLabel, Histogram>,
    wal_flush_failures: Family<LogLabel, Counter>,
    downstream_calls: Family<ResultLabel, Counter>,
    downstream_seconds: Histogram,
    processed: Family<ResultLabel, Counter>,
    reconciler_actions: Family<ResultLabel, Counter>,
    ledger_transactions: Family<StateLabel, Gauge>,
    api_rejected: Family<ReasonLabel, Counter>,
    recovery_waiting: Gauge,
    recovery_oldest_wait: Gauge<f64, AtomicU64>,
    resend: Family<ResultLabel, Counter>,
    dependency_returned: Family<DependencyLabel, Counter>,
    rejected_unrecorded: Counter,
    http_protocol_errors: Counter,
}

fn get() -> &'static Metrics {
    static M: OnceLock<Metrics> = OnceLock::new();
    M.get_or_init(|| {
        let mut registry = Registry::with_prefix("rtpd");
        let ingest_requests = Family::<CodeLabel, Counter>::default();
        registry.register(
            "ingest_requests",
            "Transaction POSTs by response status",
            ingest_requests.clone(),
        );
        let ingest_seconds = Histogram::new(latency_buckets());
        registry.register(
            "ingest_duration_seconds",
            "Time from request to durability receipt",
            ingest_seconds.clone(),
        );
        let wal_flush_seconds = Family::<LogLabel, Histogram>::new_with_constructor(|| {
            Histogram::new(latency_buckets())
        });
        registry.register(
            "wal_flush_duration_seconds",
            "Time to make one segment durable",
            wal_flush_seconds.clone(),
        );
        let wal_flush_records = Family::<LogLabel, Histogram>::new_with_constructor(|| {
            Histogram::new([
                1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0,
            ])
        });
        registry.register(
            "wal_flush_records",
            "Records per flushed segment (group commit batch size)",
            wal_flush_records.clone(),
        );
        let wal_flush_failures = Family::<LogLabel, Counter>::default();
        registry.register(
            "wal_flush_failures",
            "Segments that could not be made durable",
            wal_flush_failures.clone(),
        );
        let downstream_calls = Family::<ResultLabel, Counter>::default();
        registry.register(
            "downstream_calls",
            "Downstream calls by classified result",
            downstream_calls.clone(),
        );
        let downstream_seconds = Histogram::new(latency_buckets());
        registry.register(
            "downstream_duration_seconds",
            "Downstream call latency",
            downstream_seconds.clone(),
        );
        let processed = Family::<ResultLabel, Counter>::default();
        registry.register(
            "processed",
            "Queue messages handled by outcome",
            processed.clone(),
        );
        let reconciler_actions = Family::<ResultLabel, Counter>::default();
        registry.register(
            "reconciler_actions",
            "Reconciler findings and re-drives",
            reconciler_actions.clone(),
        );
        let ledger_transactions = Family::<StateLabel, Gauge>::default();
        registry.register(
            "ledger_transactions",
            "Transactions in the ledger by state",
            ledger_transactions.clone(),
        );
        let api_rejected = Family::<ReasonLabel, Counter>::default();
        registry.register(
            "api_rejected",
            "API calls refused (4xx other than 404/405, and load shedding) by reason",
            api_rejected.clone(),
        );
        let recovery_waiting = Gauge::default();
        registry.register(
            "recovery_waiting",
            "Transactions held back by a dependency outage (kept locked for the ledger or journal, or waiting to be resent)",
            recovery_waiting.clone(),
        );
        let recovery_oldest_wait = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "recovery_oldest_wait_seconds",
            "How long the oldest transaction held back by a dependency outage has waited",
            recovery_oldest_wait.clone(),
        );
        let resend = Family::<ResultLabel, Counter>::default();
        registry.register(
            "resend",
            "In-process resend queue: failed sends queued, sent, failed again, dropped (full), refused (a permanent queue error; left to the reconciler)",
            resend.clone(),
        );
        let dependency_returned = Family::<DependencyLabel, Counter>::default();
        registry.register(
            "dependency_returned",
            "A dependency answered again after an outage (each triggers a recovery pass)",
            dependency_returned.clone(),
        );
        let rejected_unrecorded = Counter::default();
        registry.register(
            "rejected_calls_unrecorded",
            "Refused calls left out of rejected/v1 by sampling (counted in the next record of the same source and reason)",
            rejected_unrecorded.clone(),
        );
        let http_protocol_errors = Counter::default();
        registry.register(
            "http_protocol_errors",
            "Connections closed by the HTTP/1 parser for a malformed request or body (answered by actix before any route)",
            http_protocol_errors.clone(),
        );
        Metrics {
            recovery_waiting,
            recovery_oldest_wait,
            resend,
            dependency_returned,
            http_protocol_errors,
            api_rejected,
            rejected_unrecorded,
            registry,
            ingest_requests,
            ingest_seconds,
            wal_flush_seconds,
            wal_flush_records,
            wal_flush_failures,
            downstream_calls,
            downstream_seconds,
            processed,
            reconciler_actions,
            ledger_transactions,
        }
    })
}

pub fn ingest_answered(code: u16, took: Duration) {
    let m = get();
    m.ingest_requests.get_or_create(&CodeLabel { code }).inc();
    m.ingest_seconds.observe(took.as_secs_f64());
}

pub fn api_rejected(reason: &'static str) {
    get()
        .api_rejected
        .get_or_create(&ReasonLabel { reason })
        .inc();
}

pub fn http_protocol_error() {
    get().http_protocol_errors.inc();
}

pub fn rejected_call_unrecorded() {
    get().rejected_unrecorded.inc();
}

pub fn wal_flushed(log: &'static str, records: usize, took: Duration, ok: bool) {
    let m = get();
    let l = LogLabel { log };
    if ok {
        m.wal_flush_seconds
            .get_or_create(&l)
            .observe(took.as_secs_f64());
        m.wal_flush_records
            .get_or_create(&l)
            .observe(records as f64);
    } else {
        m.wal_flush_failures.get_or_create(&l).inc();
    }
}

pub fn downstream_called(result: &'static str, took: Duration) {
    let m = get();
    m.downstream_calls
        .get_or_create(&ResultLabel { result })
        .inc();
    m.downstream_seconds.observe(took.as_secs_f64());
}

pub fn processed(result: &'static str) {
    get().processed.get_or_create(&ResultLabel { result }).inc();
}

pub fn reconciler(result: &'static str, n: u64) {
    get()
        .reconciler_actions
        .get_or_create(&ResultLabel { result })
        .inc_by(n);
}

pub fn recovery_waiting(n: usize, oldest: Duration) {
    let m = get();
    m.recovery_waiting.set(n as i64);
    m.recovery_oldest_wait.set(oldest.as_secs_f64());
}

pub fn resend(result: &'static str) {
    get().resend.get_or_create(&ResultLabel { result }).inc();
}

pub fn dependency_returned(dependency: &'static str) {
    get()
        .dependency_returned
        .get_or_create(&DependencyLabel { dependency })
        .inc();
}

/// Prometheus text exposition, with the ledger's state counts as gauges.
pub fn render(counts: Option<&Counts>) -> String {
    let m = get();
    if let Some(c) = counts {
        for (state, n) in c.by_state() {
            m.ledger_transactions
                .get_or_create(&StateLabel {
                    state: state.as_str(),
                })
                .set(n as i64);
        }
    }
    let mut out = String::new();
    if encode(&mut out, &m.registry).is_err() {
        out.clear();
    }
    out
}
