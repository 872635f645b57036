//! Process metrics: Prometheus text via `prometheus-client` for `/metrics`,
//! and the same names over OTLP when an exporter is configured
//! ([`export_over_otlp`]). Names live here and only here; labels have few
//! distinct values. Every notable occurrence bumps one metric through a
//! function of this module.

use chrono::{DateTime, Utc};
use opentelemetry::{
    KeyValue,
    metrics::{Counter as OtelCounter, Histogram as OtelHistogram, Meter},
};
use prometheus_client::metrics::gauge::Gauge as PromGauge;
use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};
use std::sync::{Mutex, atomic::AtomicU64};
use std::{sync::OnceLock, time::Duration};

use crate::ledger::{Counts, Ledger, LedgerError};
use crate::transaction::State;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct IngestLabel {
    code: u16,
    caller: &'static str,
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

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CauseLabel {
    cause: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KafkaPartitionLabel {
    topic: String,
    partition: i32,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PortCallLabel {
    port: &'static str,
    op: &'static str,
    result: &'static str,
}

const LATENCY_BUCKETS: [f64; 15] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];
const BATCH_BUCKETS: [f64; 12] = [
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0,
];

// Help texts shared by both exports.
const RECOVERY_WAITING_HELP: &str = "Transactions held back by a dependency outage (kept locked for the ledger or journal, or waiting to be resent)";
const RECOVERY_OLDEST_WAIT_HELP: &str =
    "How long the oldest transaction held back by a dependency outage has waited";
const LEDGER_REBUILDS_HELP: &str = "Automatic ledger rebuilds after the ledger was found without its intact mark (lost its data, or new): marked (ingest accepts again) or unfinished (tried again)";
const RESEND_HELP: &str = "In-process resend queue: failed sends queued, sent, failed again, dropped (full), refused (a permanent queue error; left to the reconciler)";
const DEPENDENCY_RETURNED_HELP: &str =
    "A dependency answered again after an outage (each triggers a recovery pass)";
const REJECTED_UNRECORDED_HELP: &str = "Refused calls left out of rejected/v1 by sampling (counted in the next record of the same source and reason)";
const FORWARDED_FOR_IGNORED_HELP: &str = "Requests with X-Forwarded-For from a peer not in RTPD_TRUSTED_PROXIES while that list is set (the proxy's address may have moved out of it)";
const KAFKA_RECORDS_HELP: &str = "Kafka records taken by the intake: accepted (new, durable), duplicate (same id and bytes as a transaction the ledger holds), dead_lettered (refused; on the dead-letter topic)";
const KAFKA_LAG_HELP: &str =
    "Kafka consumer lag per assigned partition (records behind the partition's end)";
const KAFKA_PAUSED_HELP: &str = "1 while the Kafka intake has partitions paused (a dependency does not answer, RTPD_KAFKA_MAX_IN_FLIGHT records are in intake, or the dead-letter topic does not take a record)";
const HTTP_PROTOCOL_ERRORS_HELP: &str = "Connections closed by the HTTP/1 parser for a malformed request or body (answered by actix before any route)";

fn latency_buckets() -> impl Iterator<Item = f64> {
    LATENCY_BUCKETS.into_iter()
}

struct Metrics {
    registry: Registry,
    ingest_requests: Family<IngestLabel, Counter>,
    ingest_seconds: Histogram,
    wal_flush_seconds: Family<LogLabel, Histogram>,
    wal_flush_records: Family<LogLabel, Histogram>,
    wal_flush_failures: Family<LogLabel, Counter>,
    downstream_calls: Family<ResultLabel, Counter>,
    downstream_seconds: Family<ResultLabel, Histogram>,
    processed: Family<ResultLabel, Counter>,
    reconciler_actions: Family<ResultLabel, Counter>,
    ledger_transactions: Family<StateLabel, Gauge>,
    oldest_pending_age: PromGauge<f64, AtomicU64>,
    dead_lettered: Family<CauseLabel, Counter>,
    port_calls: Family<PortCallLabel, Histogram>,
    api_rejected: Family<ReasonLabel, Counter>,
    recovery_waiting: Gauge,
    recovery_oldest_wait: Gauge<f64, AtomicU64>,
    resend: Family<ResultLabel, Counter>,
    ledger_rebuilds: Family<ResultLabel, Counter>,
    dependency_returned: Family<DependencyLabel, Counter>,
    rejected_unrecorded: Counter,
    http_protocol_errors: Counter,
    forwarded_for_ignored: Counter,
    kafka_records: Family<OutcomeLabel, Counter>,
    kafka_lag: Family<KafkaPartitionLabel, Gauge>,
    kafka_paused: Gauge,
}

fn get() -> &'static Metrics {
    static M: OnceLock<Metrics> = OnceLock::new();
    M.get_or_init(|| {
        let mut registry = Registry::with_prefix("rtpd");
        let ingest_requests = Family::<IngestLabel, Counter>::default();
        registry.register(
            "ingest_requests",
            "Transaction POSTs by response status and caller (credentialed, unverified, anonymous)",
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
        let wal_flush_records =
            Family::<LogLabel, Histogram>::new_with_constructor(|| Histogram::new(BATCH_BUCKETS));
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
        let downstream_seconds = Family::<ResultLabel, Histogram>::new_with_constructor(|| {
            Histogram::new(latency_buckets())
        });
        registry.register(
            "downstream_duration_seconds",
            "Downstream call latency by classified result",
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
        let oldest_pending_age = PromGauge::<f64, AtomicU64>::default();
        registry.register(
            "oldest_pending_age_seconds",
            "Age of the oldest transaction waiting in pending (0 when none)",
            oldest_pending_age.clone(),
        );
        let dead_lettered = Family::<CauseLabel, Counter>::default();
        registry.register(
            "dead_lettered",
            "Transactions and messages dead-lettered, by cause",
            dead_lettered.clone(),
        );
        let port_calls = Family::<PortCallLabel, Histogram>::new_with_constructor(|| {
            Histogram::new(latency_buckets())
        });
        registry.register(
            "port_call_duration_seconds",
            "Ledger and queue calls by port, operation and result",
            port_calls.clone(),
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
            RECOVERY_WAITING_HELP,
            recovery_waiting.clone(),
        );
        let recovery_oldest_wait = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "recovery_oldest_wait_seconds",
            RECOVERY_OLDEST_WAIT_HELP,
            recovery_oldest_wait.clone(),
        );
        let resend = Family::<ResultLabel, Counter>::default();
        registry.register("resend", RESEND_HELP, resend.clone());
        let ledger_rebuilds = Family::<ResultLabel, Counter>::default();
        registry.register(
            "ledger_rebuilds",
            LEDGER_REBUILDS_HELP,
            ledger_rebuilds.clone(),
        );
        let dependency_returned = Family::<DependencyLabel, Counter>::default();
        registry.register(
            "dependency_returned",
            DEPENDENCY_RETURNED_HELP,
            dependency_returned.clone(),
        );
        let rejected_unrecorded = Counter::default();
        registry.register(
            "rejected_calls_unrecorded",
            REJECTED_UNRECORDED_HELP,
            rejected_unrecorded.clone(),
        );
        let forwarded_for_ignored = Counter::default();
        registry.register(
            "forwarded_for_ignored",
            FORWARDED_FOR_IGNORED_HELP,
            forwarded_for_ignored.clone(),
        );
        let http_protocol_errors = Counter::default();
        registry.register(
            "http_protocol_errors",
            HTTP_PROTOCOL_ERRORS_HELP,
            http_protocol_errors.clone(),
        );
        let kafka_records = Family::<OutcomeLabel, Counter>::default();
        registry.register("kafka_records", KAFKA_RECORDS_HELP, kafka_records.clone());
        let kafka_lag = Family::<KafkaPartitionLabel, Gauge>::default();
        registry.register("kafka_consumer_lag", KAFKA_LAG_HELP, kafka_lag.clone());
        let kafka_paused = Gauge::default();
        registry.register("kafka_paused", KAFKA_PAUSED_HELP, kafka_paused.clone());
        Metrics {
            kafka_records,
            kafka_lag,
            kafka_paused,
            recovery_waiting,
            recovery_oldest_wait,
            resend,
            ledger_rebuilds,
            dependency_returned,
            http_protocol_errors,
            forwarded_for_ignored,
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
            oldest_pending_age,
            dead_lettered,
            port_calls,
        }
    })
}

/// The same metrics as OTel instruments, once an exporter is configured.
struct Otel {
    ingest_requests: OtelCounter<u64>,
    ingest_seconds: OtelHistogram<f64>,
    wal_flush_seconds: OtelHistogram<f64>,
    wal_flush_records: OtelHistogram<u64>,
    wal_flush_failures: OtelCounter<u64>,
    downstream_calls: OtelCounter<u64>,
    downstream_seconds: OtelHistogram<f64>,
    processed: OtelCounter<u64>,
    reconciler_actions: OtelCounter<u64>,
    dead_lettered: OtelCounter<u64>,
    port_calls: OtelHistogram<f64>,
    api_rejected: OtelCounter<u64>,
    resend: OtelCounter<u64>,
    ledger_rebuilds: OtelCounter<u64>,
    dependency_returned: OtelCounter<u64>,
    rejected_unrecorded: OtelCounter<u64>,
    http_protocol_errors: OtelCounter<u64>,
    forwarded_for_ignored: OtelCounter<u64>,
    kafka_records: OtelCounter<u64>,
}

/// Kafka lag per partition and whether the intake is paused, for the OTLP gauges.
static KAFKA: Mutex<KafkaGauges> = Mutex::new(KafkaGauges {
    lag: Vec::new(),
    paused: false,
});

struct KafkaGauges {
    lag: Vec<((String, i32), i64)>,
    paused: bool,
}

fn kafka_gauges() -> std::sync::MutexGuard<'static, KafkaGauges> {
    KAFKA.lock().unwrap_or_else(|e| e.into_inner())
}

/// What waits on recovery (count, oldest wait in seconds), for the OTLP gauges.
static RECOVERY: Mutex<(i64, f64)> = Mutex::new((0, 0.0));

static OTEL: OnceLock<Otel> = OnceLock::new();

/// What the ledger said when last asked, for the gauges of both exports.
#[derive(Default)]
struct LedgerSnapshot {
    counts: Option<Counts>,
    oldest_pending: Option<DateTime<Utc>>,
}

static LEDGER: Mutex<LedgerSnapshot> = Mutex::new(LedgerSnapshot {
    counts: None,
    oldest_pending: None,
});

fn snapshot() -> (Option<Counts>, Option<DateTime<Utc>>) {
    let s = LEDGER.lock().unwrap_or_else(|e| e.into_inner());
    (s.counts, s.oldest_pending)
}

fn age_secs(oldest: Option<DateTime<Utc>>) -> f64 {
    oldest
        .map(|t| ((crate::clock::now() - t).num_milliseconds().max(0) as f64) / 1000.0)
        .unwrap_or(0.0)
}

/// Builds the OTel instruments and keeps their names, so a test can hold
/// them against the Prometheus registry's.
struct Instruments {
    m: Meter,
    names: Vec<&'static str>,
}

impl Instruments {
    fn counter(&mut self, name: &'static str, help: &'static str) -> OtelCounter<u64> {
        self.names.push(name);
        self.m.u64_counter(name).with_description(help).build()
    }

    fn seconds(&mut self, name: &'static str, help: &'static str) -> OtelHistogram<f64> {
        self.names.push(name);
        self.m
            .f64_histogram(name)
            .with_description(help)
            .with_unit("s")
            .with_boundaries(LATENCY_BUCKETS.to_vec())
            .build()
    }

    fn records(&mut self, name: &'static str, help: &'static str) -> OtelHistogram<u64> {
        self.names.push(name);
        self.m
            .u64_histogram(name)
            .with_description(help)
            .with_boundaries(BATCH_BUCKETS.to_vec())
            .build()
    }

    /// An observable gauge whose callback observes `read()`'s values.
    fn gauge_i64(
        &mut self,
        name: &'static str,
        help: &'static str,
        read: impl Fn(&dyn Fn(i64, &[KeyValue])) + Send + Sync + 'static,
    ) {
        self.names.push(name);
        self.m
            .i64_observable_gauge(name)
            .with_description(help)
            .with_callback(move |o| read(&|v, attrs| o.observe(v, attrs)))
            .build();
    }

    fn gauge_seconds(
        &mut self,
        name: &'static str,
        help: &'static str,
        read: impl Fn() -> Option<f64> + Send + Sync + 'static,
    ) {
        self.names.push(name);
        self.m
            .f64_observable_gauge(name)
            .with_description(help)
            .with_unit("s")
            .with_callback(move |o| {
                if let Some(v) = read() {
                    o.observe(v, &[]);
                }
            })
            .build();
    }
}

impl Otel {
    fn build(m: Meter) -> (Otel, Vec<&'static str>) {
        let mut i = Instruments {
            m,
            names: Vec::new(),
        };
        // Observable gauges: read at each export from the last ledger snapshot.
        i.gauge_i64(
            "rtpd_ledger_transactions",
            "Transactions in the ledger by state",
            |observe| {
                if let (Some(c), _) = snapshot() {
                    for (state, n) in c.by_state() {
                        observe(n as i64, &[KeyValue::new("state", state.as_str())]);
                    }
                }
            },
        );
        i.gauge_seconds(
            "rtpd_oldest_pending_age_seconds",
            "Age of the oldest transaction waiting in pending (0 when none)",
            || {
                let (counts, oldest) = snapshot();
                counts.map(|_| age_secs(oldest))
            },
        );
        // The recovery gauges are set as things happen (`recovery_waiting`).
        i.gauge_i64("rtpd_recovery_waiting", RECOVERY_WAITING_HELP, |observe| {
            let (n, _) = *RECOVERY.lock().unwrap_or_else(|e| e.into_inner());
            observe(n, &[])
        });
        i.gauge_seconds(
            "rtpd_recovery_oldest_wait_seconds",
            RECOVERY_OLDEST_WAIT_HELP,
            || Some(RECOVERY.lock().unwrap_or_else(|e| e.into_inner()).1),
        );
        i.gauge_i64("rtpd_kafka_consumer_lag", KAFKA_LAG_HELP, |observe| {
            for ((topic, partition), lag) in &kafka_gauges().lag {
                observe(
                    *lag,
                    &[
                        KeyValue::new("topic", topic.clone()),
                        KeyValue::new("partition", i64::from(*partition)),
                    ],
                );
            }
        });
        i.gauge_i64("rtpd_kafka_paused", KAFKA_PAUSED_HELP, |observe| {
            observe(i64::from(kafka_gauges().paused), &[])
        });
        let o = Otel {
            kafka_records: i.counter("rtpd_kafka_records", KAFKA_RECORDS_HELP),
            ingest_requests: i.counter(
                "rtpd_ingest_requests",
                "Transaction POSTs by response status and caller (credentialed, unverified, anonymous)",
            ),
            ingest_seconds: i.seconds(
                "rtpd_ingest_duration_seconds",
                "Time from request to durability receipt",
            ),
            wal_flush_seconds: i.seconds(
                "rtpd_wal_flush_duration_seconds",
                "Time to make one segment durable",
            ),
            wal_flush_records: i.records(
                "rtpd_wal_flush_records",
                "Records per flushed segment (group commit batch size)",
            ),
            wal_flush_failures: i.counter(
                "rtpd_wal_flush_failures",
                "Segments that could not be made durable",
            ),
            downstream_calls: i.counter(
                "rtpd_downstream_calls",
                "Downstream calls by classified result",
            ),
            downstream_seconds: i.seconds(
                "rtpd_downstream_duration_seconds",
                "Downstream call latency by classified result",
            ),
            processed: i.counter("rtpd_processed", "Queue messages handled by outcome"),
            reconciler_actions: i.counter(
                "rtpd_reconciler_actions",
                "Reconciler findings and re-drives",
            ),
            dead_lettered: i.counter(
                "rtpd_dead_lettered",
                "Transactions and messages dead-lettered, by cause",
            ),
            port_calls: i.seconds(
                "rtpd_port_call_duration_seconds",
                "Ledger and queue calls by port, operation and result",
            ),
            api_rejected: i.counter(
                "rtpd_api_rejected",
                "API calls refused (4xx other than 404/405, and load shedding) by reason",
            ),
            resend: i.counter("rtpd_resend", RESEND_HELP),
            ledger_rebuilds: i.counter("rtpd_ledger_rebuilds", LEDGER_REBUILDS_HELP),
            dependency_returned: i.counter("rtpd_dependency_returned", DEPENDENCY_RETURNED_HELP),
            rejected_unrecorded: i
                .counter("rtpd_rejected_calls_unrecorded", REJECTED_UNRECORDED_HELP),
            http_protocol_errors: i.counter("rtpd_http_protocol_errors", HTTP_PROTOCOL_ERRORS_HELP),
            forwarded_for_ignored: i.counter("rtpd_forwarded_for_ignored", FORWARDED_FOR_IGNORED_HELP),
        };
        (o, i.names)
    }
}

/// Registers the OTel instruments on the global meter provider (set by
/// `telemetry::init` before anything is measured). Called once; later calls
/// do nothing.
pub fn export_over_otlp() {
    OTEL.get_or_init(|| Otel::build(opentelemetry::global::meter("rtpd")).0);
}

fn otel() -> Option<&'static Otel> {
    OTEL.get()
}

/// Whether the metrics go out over OTLP (then something must keep the
/// ledger gauges fresh between exports: [`watch_ledger`]).
pub fn exported_over_otlp() -> bool {
    OTEL.get().is_some()
}

/// One answer to `POST /v1/transactions`, whoever gave it (counted by
/// `api::count_ingest`, outside the limits), with who the caller turned out
/// to be: `credentialed` (a key, token or signature that checked out),
/// `unverified` (signature headers not verified by the time of the answer)
/// or `anonymous` (none, or a wrong one). The 5xx alert reads
/// `credentialed` only, so outsiders cannot move it.
pub fn ingest_answered(code: u16, caller: &'static str) {
    get()
        .ingest_requests
        .get_or_create(&IngestLabel { code, caller })
        .inc();
    if let Some(o) = otel() {
        o.ingest_requests.add(
            1,
            &[
                KeyValue::new("code", i64::from(code)),
                KeyValue::new("caller", caller),
            ],
        );
    }
}

/// How long the ingest handler took to answer (requests refused before it,
/// by a limit, take no time worth measuring and are left out).
pub fn ingest_took(took: Duration) {
    get().ingest_seconds.observe(took.as_secs_f64());
    if let Some(o) = otel() {
        o.ingest_seconds.record(took.as_secs_f64(), &[]);
    }
}

pub fn api_rejected(reason: &'static str) {
    get()
        .api_rejected
        .get_or_create(&ReasonLabel { reason })
        .inc();
    if let Some(o) = otel() {
        o.api_rejected.add(1, &[KeyValue::new("reason", reason)]);
    }
}

pub fn forwarded_for_ignored() {
    get().forwarded_for_ignored.inc();
    if let Some(o) = otel() {
        o.forwarded_for_ignored.add(1, &[]);
    }
}

/// What the Kafka intake did with a record (`accepted`, `duplicate`,
/// `dead_lettered`).
pub fn kafka_record(outcome: &'static str) {
    get()
        .kafka_records
        .get_or_create(&OutcomeLabel { outcome })
        .inc();
    if let Some(o) = otel() {
        o.kafka_records.add(1, &[KeyValue::new("outcome", outcome)]);
    }
}

/// Assigned partitions' consumer lag as read; an assigned partition not
/// read this time keeps its last value (the brokers may be what is down),
/// one no longer assigned loses its series.
pub fn kafka_consumer_lags(lags: &[((String, i32), i64)], assigned: &[(String, i32)]) {
    let family = &get().kafka_lag;
    let mut g = kafka_gauges();
    let gone: Vec<(String, i32)> = g
        .lag
        .iter()
        .map(|(p, _)| p.clone())
        .filter(|p| !assigned.contains(p))
        .collect();
    for (topic, partition) in &gone {
        family.remove(&KafkaPartitionLabel {
            topic: topic.clone(),
            partition: *partition,
        });
    }
    g.lag.retain(|(p, _)| assigned.contains(p));
    for ((topic, partition), lag) in lags {
        family
            .get_or_create(&KafkaPartitionLabel {
                topic: topic.clone(),
                partition: *partition,
            })
            .set(*lag);
        let key = (topic.clone(), *partition);
        match g.lag.iter_mut().find(|(k, _)| *k == key) {
            Some(slot) => slot.1 = *lag,
            None => g.lag.push((key, *lag)),
        }
    }
}

/// Partitions taken away by a rebalance: their lag is someone else's now.
pub fn kafka_partitions_revoked(revoked: &[(String, i32)]) {
    let family = &get().kafka_lag;
    for (topic, partition) in revoked {
        family.remove(&KafkaPartitionLabel {
            topic: topic.clone(),
            partition: *partition,
        });
    }
    kafka_gauges().lag.retain(|(p, _)| !revoked.contains(p));
}

pub fn kafka_paused(paused: bool) {
    get().kafka_paused.set(i64::from(paused));
    kafka_gauges().paused = paused;
}

pub fn http_protocol_error() {
    get().http_protocol_errors.inc();
    if let Some(o) = otel() {
        o.http_protocol_errors.add(1, &[]);
    }
}

pub fn rejected_call_unrecorded() {
    get().rejected_unrecorded.inc();
    if let Some(o) = otel() {
        o.rejected_unrecorded.add(1, &[]);
    }
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
    if let Some(o) = otel() {
        let l = [KeyValue::new("log", log)];
        if ok {
            o.wal_flush_seconds.record(took.as_secs_f64(), &l);
            o.wal_flush_records.record(records as u64, &l);
        } else {
            o.wal_flush_failures.add(1, &l);
        }
    }
}

pub fn downstream_called(result: &'static str, took: Duration) {
    let m = get();
    let l = ResultLabel { result };
    m.downstream_calls.get_or_create(&l).inc();
    m.downstream_seconds
        .get_or_create(&l)
        .observe(took.as_secs_f64());
    if let Some(o) = otel() {
        let l = [KeyValue::new("result", result)];
        o.downstream_calls.add(1, &l);
        o.downstream_seconds.record(took.as_secs_f64(), &l);
    }
}

pub fn processed(result: &'static str) {
    get().processed.get_or_create(&ResultLabel { result }).inc();
    if let Some(o) = otel() {
        o.processed.add(1, &[KeyValue::new("result", result)]);
    }
}

/// A transaction or an undecodable message went to the dead-letter state
/// (`cause`: `permanent_failure`, `retries_exhausted`, `undecodable`, ...).
pub fn dead_lettered(cause: &'static str) {
    get()
        .dead_lettered
        .get_or_create(&CauseLabel { cause })
        .inc();
    if let Some(o) = otel() {
        o.dead_lettered.add(1, &[KeyValue::new("cause", cause)]);
    }
}

/// One call through a ledger or queue port (the instrumented decorators).
pub fn port_call(port: &'static str, op: &'static str, ok: bool, took: Duration) {
    let result = if ok { "ok" } else { "error" };
    get()
        .port_calls
        .get_or_create(&PortCallLabel { port, op, result })
        .observe(took.as_secs_f64());
    if let Some(o) = otel() {
        o.port_calls.record(
            took.as_secs_f64(),
            &[
                KeyValue::new("port", port),
                KeyValue::new("op", op),
                KeyValue::new("result", result),
            ],
        );
    }
}

pub fn reconciler(result: &'static str, n: u64) {
    get()
        .reconciler_actions
        .get_or_create(&ResultLabel { result })
        .inc_by(n);
    if let Some(o) = otel() {
        o.reconciler_actions
            .add(n, &[KeyValue::new("result", result)]);
    }
}

pub fn recovery_waiting(n: usize, oldest: Duration) {
    let m = get();
    m.recovery_waiting.set(n as i64);
    m.recovery_oldest_wait.set(oldest.as_secs_f64());
    *RECOVERY.lock().unwrap_or_else(|e| e.into_inner()) = (n as i64, oldest.as_secs_f64());
}

pub fn resend(result: &'static str) {
    get().resend.get_or_create(&ResultLabel { result }).inc();
    if let Some(o) = otel() {
        o.resend.add(1, &[KeyValue::new("result", result)]);
    }
}

/// An automatic ledger rebuild ended: marked intact, or not (yet).
pub fn ledger_rebuilt(marked: bool) {
    let result = if marked { "marked" } else { "unfinished" };
    get()
        .ledger_rebuilds
        .get_or_create(&ResultLabel { result })
        .inc();
    if let Some(o) = otel() {
        o.ledger_rebuilds.add(1, &[KeyValue::new("result", result)]);
    }
}

pub fn dependency_returned(dependency: &'static str) {
    get()
        .dependency_returned
        .get_or_create(&DependencyLabel { dependency })
        .inc();
    if let Some(o) = otel() {
        o.dependency_returned
            .add(1, &[KeyValue::new("dependency", dependency)]);
    }
}

/// Reads the ledger's counts and its oldest pending transaction into the
/// gauges (`rtpd_ledger_transactions`, `rtpd_oldest_pending_age_seconds`).
/// Called on each Prometheus scrape and periodically by the service, so the
/// OTLP export sees fresh values too. Returns the counts.
pub async fn observe_ledger(ledger: &dyn Ledger) -> Result<Counts, LedgerError> {
    let counts = ledger.counts().await?;
    let oldest = ledger.oldest_update(State::Pending).await?;
    let mut s = LEDGER.lock().unwrap_or_else(|e| e.into_inner());
    s.counts = Some(counts);
    s.oldest_pending = oldest;
    Ok(counts)
}

/// Keeps the ledger gauges fresh for the OTLP export (which has no scrape
/// to trigger [`observe_ledger`]) until `stop` turns true.
pub async fn watch_ledger(
    ledger: std::sync::Arc<dyn Ledger>,
    every: Duration,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        if let Err(e) = observe_ledger(ledger.as_ref()).await {
            tracing::debug!(error = %e, "could not read the ledger gauges");
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.changed() => return,
        }
    }
}

/// The gauges' last values: state counts and the oldest pending age in seconds.
pub fn ledger_gauges() -> (Option<Counts>, f64) {
    let (counts, oldest) = snapshot();
    (counts, age_secs(oldest))
}

/// Prometheus text exposition, with the ledger gauges as last observed.
pub fn render() -> String {
    let m = get();
    let (counts, oldest) = snapshot();
    if let Some(c) = counts {
        for (state, n) in c.by_state() {
            m.ledger_transactions
                .get_or_create(&StateLabel {
                    state: state.as_str(),
                })
                .set(n as i64);
        }
        m.oldest_pending_age.set(age_secs(oldest));
    }
    let mut out = String::new();
    if encode(&mut out, &m.registry).is_err() {
        out.clear();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    /// Every series on `/metrics` is exported over OTLP under the same
    /// name, and nothing else is.
    #[test]
    fn the_otlp_instruments_are_the_prometheus_series() {
        let prometheus: BTreeSet<String> = render()
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .filter_map(|l| l.split(' ').next())
            .map(str::to_owned)
            .collect();
        assert!(prometheus.len() > 10, "{prometheus:?}");
        let (_, names) = Otel::build(opentelemetry::global::meter("names"));
        let otlp: BTreeSet<String> = names.iter().map(|n| n.to_string()).collect();
        assert_eq!(otlp.len(), names.len(), "an instrument built twice");
        let missing: Vec<_> = prometheus.difference(&otlp).collect();
        let extra: Vec<_> = otlp.difference(&prometheus).collect();
        assert!(
            missing.is_empty() && extra.is_empty(),
            "on /metrics only: {missing:?}; over OTLP only: {extra:?}"
        );
    }
}
