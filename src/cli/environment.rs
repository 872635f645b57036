//! The `Environment:` and `Exit status:` sections of each subcommand's
//! `--help`, generated from one table: which part of the configuration each
//! `RTPD_*` variable belongs to, and which parts each subcommand reads. The
//! names come from [`ENV_NAMES`], so the help cannot list a variable rtpd does
//! not read; a test keeps the table and the list in step.

use crate::config::{ENV_NAMES, Settings};

/// Parts of the configuration, as a set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reads(u8);

impl Reads {
    /// Logging and the config file: every subcommand.
    pub const LOGGING: Reads = Reads(1);
    /// Where the WAL, the ledger and the queue are.
    pub const BACKENDS: Reads = Reads(1 << 1);
    /// The HTTP server and its operators (the API, and the processor's health server).
    pub const SERVER: Reads = Reads(1 << 2);
    /// Vendors: credentials and limits of ingest.
    pub const VENDORS: Reads = Reads(1 << 3);
    /// Processing: the downstream, retries, the background reconciler.
    pub const PROCESSING: Reads = Reads(1 << 4);
    /// When an untouched `pending` transaction counts as lost.
    pub const REDRIVE: Reads = Reads(1 << 5);
    /// The Kafka intake.
    pub const KAFKA: Reads = Reads(1 << 6);
    /// The operations console (the API process only).
    pub const CONSOLE: Reads = Reads(1 << 7);
    pub const ALL: Reads = Reads(u8::MAX);

    const fn with(self, other: Reads) -> Reads {
        Reads(self.0 | other.0)
    }

    fn overlaps(self, other: Reads) -> bool {
        self.0 & other.0 != 0
    }
}

/// Each variable's part of the configuration and what it means.
const VARIABLES: &[(&str, Reads, &str)] = &[
    (
        "RTPD_CONFIG_FILE",
        Reads::LOGGING,
        "TOML file with any of these settings (keys in lower case, no prefix)",
    ),
    ("RTPD_LOG_FORMAT", Reads::LOGGING, "text or json"),
    ("RTPD_LOG_LEVEL", Reads::LOGGING, "tracing filter"),
    (
        "RTPD_DATA_DIR",
        Reads::BACKENDS,
        "where the embedded backends keep their data",
    ),
    (
        "RTPD_INSTANCE_ID",
        Reads::BACKENDS,
        "name in lease owners and segment keys (default: hostname-pid)",
    ),
    ("RTPD_WAL", Reads::BACKENDS, "local or azure"),
    (
        "RTPD_STORAGE_CONNECTION_STRING",
        Reads::BACKENDS,
        "Blob Storage connection string (Azurite, account key, SAS)",
    ),
    (
        "RTPD_STORAGE_ACCOUNT_URL",
        Reads::BACKENDS,
        "https://<account>.blob.core.windows.net, with Entra ID",
    ),
    (
        "RTPD_WAL_CONTAINER",
        Reads::BACKENDS,
        "blob container of the WAL",
    ),
    (
        "RTPD_WAL_CREATE_CONTAINER",
        Reads::BACKENDS,
        "create the container at start-up (default: with a connection string)",
    ),
    (
        "RTPD_WAL_BATCH_MAX_RECORDS",
        Reads::BACKENDS,
        "records per WAL segment at most",
    ),
    (
        "RTPD_WAL_FLUSHERS",
        Reads::BACKENDS,
        "WAL segment flushes in flight",
    ),
    (
        "RTPD_AZURE_CLIENT_ID",
        Reads::BACKENDS,
        "user-assigned managed identity (else the standard AZURE_CLIENT_ID)",
    ),
    ("RTPD_LEDGER", Reads::BACKENDS, "local, redis or postgres"),
    (
        "RTPD_POSTGRES_URL",
        Reads::BACKENDS,
        "PostgreSQL connection URL (postgresql://…)",
    ),
    (
        "RTPD_POSTGRES_ENTRA",
        Reads::BACKENDS,
        "Entra ID tokens as the PostgreSQL password",
    ),
    (
        "RTPD_POSTGRES_PAYLOAD",
        Reads::BACKENDS,
        "also keep each payload in the PostgreSQL ledger (messages view)",
    ),
    (
        "RTPD_REDIS_URL",
        Reads::BACKENDS,
        "redis:// or rediss:// (default redis://127.0.0.1:6379)",
    ),
    ("RTPD_REDIS_KEY_PREFIX", Reads::BACKENDS, "Redis key prefix"),
    (
        "RTPD_REDIS_ENTRA",
        Reads::BACKENDS,
        "Entra ID tokens as the Redis password",
    ),
    (
        "RTPD_LEDGER_RETENTION_DAYS",
        Reads::BACKENDS,
        "days finished transactions stay in the ledger",
    ),
    (
        "RTPD_WAL_RETENTION_DAYS",
        Reads::BACKENDS,
        "days of WAL kept; operator time ranges (replay, wal, reconcile) may not reach further back",
    ),
    ("RTPD_QUEUE", Reads::BACKENDS, "local or servicebus"),
    (
        "RTPD_SERVICEBUS_CONNECTION_STRING",
        Reads::BACKENDS,
        "Service Bus SAS or emulator connection string",
    ),
    (
        "RTPD_SERVICEBUS_NAMESPACE",
        Reads::BACKENDS,
        "<ns>.servicebus.windows.net, with Entra ID",
    ),
    ("RTPD_SERVICEBUS_QUEUE", Reads::BACKENDS, "queue name"),
    (
        "RTPD_SERVICEBUS_TRANSPORT",
        Reads::BACKENDS,
        "amqp (5671) or websockets (443)",
    ),
    (
        "RTPD_SERVICEBUS_CUSTOM_ENDPOINT",
        Reads::BACKENDS,
        "connect to this address instead of the namespace host",
    ),
    (
        "RTPD_SERVICEBUS_CA_FILE",
        Reads::BACKENDS,
        "extra CA certificate (PEM) to trust for Service Bus",
    ),
    (
        "RTPD_SERVICEBUS_SEND_TIMEOUT_SECS",
        Reads::BACKENDS,
        "how long one Service Bus send may take, busy waits included",
    ),
    (
        "RTPD_LOCK_DURATION_SECS",
        Reads::BACKENDS,
        "embedded queue's message lock",
    ),
    (
        "RTPD_MAX_DELIVERY_COUNT",
        Reads::BACKENDS,
        "embedded queue's deliveries before its dead-letter queue",
    ),
    ("RTPD_HTTP_ADDR", Reads::SERVER, "listen address"),
    (
        "RTPD_AUTH",
        Reads::SERVER,
        "keys, or none (no credentials checked, warned)",
    ),
    (
        "RTPD_ADMIN_TOKENS",
        Reads::SERVER,
        "operators: <name>:sha256:<hex of token>, comma separated",
    ),
    (
        "RTPD_ADMIN_TOKENS_FILE",
        Reads::SERVER,
        "a file of admin tokens; re-read on change and on SIGHUP",
    ),
    (
        "RTPD_PUBLIC_HEALTH",
        Reads::SERVER,
        "/healthz and /readyz without a token",
    ),
    (
        "RTPD_PUBLIC_METRICS",
        Reads::SERVER,
        "/metrics and /status without a token",
    ),
    (
        "RTPD_CREDENTIALS_POLL_SECS",
        Reads::SERVER,
        "how often credential files are re-read (0: only on SIGHUP)",
    ),
    (
        "RTPD_MAX_HEADER_BYTES",
        Reads::SERVER,
        "request line and headers at most (431)",
    ),
    (
        "RTPD_REQUEST_TIMEOUT_SECS",
        Reads::SERVER,
        "time to send the request head, and again the body (408)",
    ),
    (
        "RTPD_MAX_IN_FLIGHT",
        Reads::SERVER,
        "requests handled at once (503 + Retry-After)",
    ),
    (
        "RTPD_MAX_IN_FLIGHT_UNAUTHENTICATED",
        Reads::SERVER,
        "requests without a valid credential (signed ones until verified) handled at once, a pool of their own (503)",
    ),
    (
        "RTPD_UNAUTHENTICATED_RATE_PER_SEC",
        Reads::SERVER,
        "requests without a valid credential per source address (IPv6: /64) per second (429; 0: off)",
    ),
    (
        "RTPD_UNAUTHENTICATED_RATE_BURST",
        Reads::SERVER,
        "burst above that rate, per source address",
    ),
    (
        "RTPD_MAX_UNVERIFIED_PER_SOURCE",
        Reads::SERVER,
        "signed requests of one source address waiting for their bodies in the unauthenticated pool (429; default: a quarter of that pool)",
    ),
    (
        "RTPD_TRUSTED_PROXIES",
        Reads::SERVER,
        "proxies (addresses or CIDR ranges, comma separated) whose X-Forwarded-For names the source address of the per-address limits (default: none)",
    ),
    (
        "RTPD_TRUSTED_PROXY_HOPS",
        Reads::SERVER,
        "how many proxies append to X-Forwarded-For in front of rtpd: the client is the entry that many from the right (1 for Container Apps' Envoy; default 0: skip every trusted address from the right)",
    ),
    (
        "RTPD_CONSOLE",
        Reads::CONSOLE,
        "the operations console at /console, behind the admin token (false: 404)",
    ),
    (
        "RTPD_CONSOLE_REDACT",
        Reads::CONSOLE,
        "payload fields the console shows redacted, by name at any depth, comma separated (none: off; default: iban, account and card numbers, see docs/console.md)",
    ),
    (
        "RTPD_VENDOR_KEYS",
        Reads::VENDORS,
        "vendors: <vendor>:sha256:<hex of key>, comma separated",
    ),
    (
        "RTPD_VENDOR_KEYS_FILE",
        Reads::VENDORS,
        "a file of vendor keys and signing secrets (hmac, whsec); re-read on change and on SIGHUP",
    ),
    (
        "RTPD_SIGNATURE_WINDOW_SECS",
        Reads::VENDORS,
        "signed requests' timestamp tolerance, either way",
    ),
    (
        "RTPD_MAX_BODY_BYTES",
        Reads::VENDORS.with(Reads::KAFKA),
        "largest body (413), and Kafka record value (dead-lettered)",
    ),
    (
        "RTPD_VENDOR_RATE_PER_SEC",
        Reads::VENDORS,
        "per-vendor rate (429 + Retry-After; 0: off)",
    ),
    (
        "RTPD_VENDOR_RATE_BURST",
        Reads::VENDORS,
        "per-vendor burst above the rate",
    ),
    (
        "RTPD_DOWNSTREAM_URL",
        Reads::PROCESSING,
        "the payment service",
    ),
    (
        "RTPD_DOWNSTREAM_TIMEOUT_SECS",
        Reads::PROCESSING,
        "per downstream call",
    ),
    (
        "RTPD_MAX_RETRIES",
        Reads::PROCESSING,
        "retries before dead-letter",
    ),
    (
        "RTPD_BACKOFF_BASE_SECS",
        Reads::PROCESSING,
        "first retry delay (doubles, ±20% jitter)",
    ),
    (
        "RTPD_BACKOFF_MAX_SECS",
        Reads::PROCESSING,
        "longest retry delay",
    ),
    (
        "RTPD_PROCESSOR_CONCURRENCY",
        Reads::PROCESSING,
        "messages processed at once",
    ),
    (
        "RTPD_RECONCILE_INTERVAL_SECS",
        Reads::PROCESSING,
        "background reconciler: time between passes",
    ),
    (
        "RTPD_RECOVERY_PROBE_SECS",
        Reads::PROCESSING,
        "how often the WAL, ledger and queue are probed; one that returns triggers a reconcile pass at once",
    ),
    (
        "RTPD_RECONCILE_LOOKBACK_SECS",
        Reads::PROCESSING,
        "background reconciler: window without a watermark",
    ),
    (
        "RTPD_RECONCILE_PENDING_AFTER_SECS",
        Reads::REDRIVE,
        "when an untouched pending transaction counts as lost and is re-driven",
    ),
];

/// The standard OpenTelemetry variables rtpd honours (no `RTPD_` copies):
/// export is off unless an endpoint is set.
const OTEL_VARIABLES: &[(&str, &str)] = &[
    (
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTLP collector for traces and metrics; export is off when unset",
    ),
    (
        "OTEL_EXPORTER_OTLP_PROTOCOL",
        "grpc or http/protobuf (default); _TRACES_/_METRICS_ variants per signal",
    ),
    (
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        "traces only, full URL (also _METRICS_ENDPOINT)",
    ),
    (
        "OTEL_SERVICE_NAME",
        "service name on every span and metric [default: rtpd]",
    ),
    (
        "OTEL_RESOURCE_ATTRIBUTES",
        "more resource attributes, k=v,k2=v2",
    ),
    (
        "OTEL_METRIC_EXPORT_INTERVAL",
        "milliseconds between metric exports [default: 60000]",
    ),
    (
        "OTEL_BSP_MAX_QUEUE_SIZE",
        "spans held while the collector is slow or down; more are dropped [default: 2048]",
    ),
    ("OTEL_SDK_DISABLED", "true turns every export off"),
];

/// The Kafka intake's variables (with `RTPD_KAFKA_CONFIG_*`, listed apart).
const KAFKA_VARIABLES: &[(&str, Reads, &str)] = &[
    (
        "RTPD_KAFKA_BOOTSTRAP_SERVERS",
        Reads::KAFKA,
        "Kafka brokers, host:port comma separated (Event Hubs: <namespace>.servicebus.windows.net:9093)",
    ),
    (
        "RTPD_KAFKA_TOPICS",
        Reads::KAFKA,
        "topics to take transactions from, comma separated; set, serve/api/dev run the Kafka intake too",
    ),
    ("RTPD_KAFKA_GROUP_ID", Reads::KAFKA, "consumer group"),
    (
        "RTPD_KAFKA_ID_FROM",
        Reads::KAFKA,
        "where a record's transaction id is: key, header:<name> or field:<name>",
    ),
    (
        "RTPD_KAFKA_VENDOR",
        Reads::KAFKA,
        "vendor the records belong to (keys <vendor>/<id>); unset: ids as they are",
    ),
    (
        "RTPD_KAFKA_DEAD_LETTER_TOPIC",
        Reads::KAFKA,
        "where refused records go, the reason in rtpd-reason and rtpd-error headers",
    ),
    (
        "RTPD_KAFKA_MAX_IN_FLIGHT",
        Reads::KAFKA,
        "records in intake at once; beyond it the partitions pause",
    ),
    (
        "RTPD_KAFKA_ENTRA",
        Reads::KAFKA,
        "SASL/OAUTHBEARER with Entra ID tokens (Event Hubs' Kafka endpoint)",
    ),
];

fn variable(name: &str) -> Option<&'static (&'static str, Reads, &'static str)> {
    VARIABLES
        .iter()
        .chain(KAFKA_VARIABLES)
        .find(|(n, _, _)| *n == name)
}

/// What each subcommand reads, and how it ends.
pub fn of(subcommand: &str) -> (Reads, &'static str) {
    const COMMON: &str = "0 done; 1 failed (one line on stderr: \"rtpd: <why>\"); 2 usage error";
    const SERVICE: &str = "0 stopped by SIGTERM or Ctrl-C; 1 failed to start (configuration, \
        backends) or a part stopped; 2 usage error";
    let logging = Reads::LOGGING;
    let backends = logging.with(Reads::BACKENDS);
    match subcommand {
        "dev" | "serve" => (Reads::ALL, SERVICE),
        "api" => (
            backends
                .with(Reads::SERVER)
                .with(Reads::VENDORS)
                .with(Reads::KAFKA)
                .with(Reads::CONSOLE),
            SERVICE,
        ),
        "kafka-intake" => (backends.with(Reads::SERVER).with(Reads::KAFKA), SERVICE),
        "processor" => (
            backends
                .with(Reads::SERVER)
                .with(Reads::PROCESSING)
                .with(Reads::REDRIVE),
            SERVICE,
        ),
        "config" => (Reads::ALL, COMMON),
        "reconcile" => (
            backends.with(Reads::REDRIVE),
            "0 done (with --dry-run: nothing to do); 3 --dry-run found drift (ledger entries \
             missing or wrong, transactions overdue for a re-drive, unreadable WAL records); \
             1 failed (one line on stderr); 2 usage error",
        ),
        "replay" => (
            backends,
            "0 every selected transaction replayed (or listed, with --dry-run); 1 failed, or \
             some were refused or not found (listed above); 2 usage error",
        ),
        "dlq" => (
            backends,
            "0 done; 1 failed, no message matches (show), --yes missing (purge), or some were \
             not replayed (replay); 2 usage error",
        ),
        "wal" | "rebuild-ledger" | "migrate" => (
            backends,
            "0 done; 1 failed or not found (one line on stderr); 2 usage error",
        ),
        "healthcheck" => (
            logging,
            "0 the URL answered 2xx within 3 s; 1 it did not; 2 usage error",
        ),
        _ => (logging, COMMON),
    }
}

/// The text after a subcommand's options in `--help`.
pub fn section(reads: Reads, exit: &str) -> String {
    let defaults = serde_json::to_value(Settings::default()).unwrap_or_default();
    let mut out = String::from("Environment:\n");
    for name in ENV_NAMES {
        // A name without a row is shown where everything is read (and a test fails).
        let (part, meaning) =
            variable(name).map_or((Reads::ALL, ""), |(_, part, meaning)| (*part, *meaning));
        if !reads.overlaps(part) {
            continue;
        }
        let field = name.trim_start_matches("RTPD_").to_ascii_lowercase();
        let default = match defaults.get(&field) {
            None | Some(serde_json::Value::Null) => String::new(),
            Some(serde_json::Value::String(s)) if s == "[redacted]" => String::new(),
            Some(v) => format!(" [default: {v}]"),
        };
        out.push_str(&format!("  {name:<36} {meaning}{default}\n"));
    }
    if reads.overlaps(Reads::KAFKA) {
        out.push_str(&format!(
            "  {:<36} {}\n",
            "RTPD_KAFKA_CONFIG_<NAME>",
            "any librdkafka property: RTPD_KAFKA_CONFIG_SASL_MECHANISM sets sasl.mechanism"
        ));
    }
    if reads.overlaps(Reads::BACKENDS) {
        out.push_str("\nOpenTelemetry (standard variables; rtpd dev also takes --otlp URL):\n");
        for (name, meaning) in OTEL_VARIABLES {
            out.push_str(&format!("  {name:<36} {meaning}\n"));
        }
    }
    out.push_str("\nExit status:\n  ");
    out.push_str(exit);
    out
}

/// Adds the sections to a subcommand and to its own subcommands.
pub fn describe(cmd: clap::Command, reads: Reads, exit: &'static str) -> clap::Command {
    let nested: Vec<String> = cmd
        .get_subcommands()
        .map(|c| c.get_name().to_owned())
        .collect();
    let mut cmd = cmd.after_help(section(reads, exit));
    for name in nested {
        cmd = cmd.mut_subcommand(name, |c| describe(c, reads, exit));
    }
    cmd
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_names_exactly_the_variables_rtpd_reads() {
        for name in ENV_NAMES {
            assert!(
                variable(name).is_some(),
                "{name} has no row in cli/environment.rs"
            );
        }
        for (name, _, _) in VARIABLES.iter().chain(KAFKA_VARIABLES) {
            assert!(ENV_NAMES.contains(name), "{name} is not in ENV_NAMES");
        }
    }

    #[test]
    fn sections_list_only_what_is_read() {
        let (reads, exit) = of("api");
        let api = section(reads, exit);
        assert!(api.contains("RTPD_VENDOR_KEYS_FILE"));
        assert!(api.contains("RTPD_MAX_BODY_BYTES") && api.contains("[default: 262144]"));
        assert!(!api.contains("RTPD_DOWNSTREAM_URL"), "{api}");
        let (reads, exit) = of("produce");
        let produce = section(reads, exit);
        assert!(produce.contains("RTPD_LOG_LEVEL") && !produce.contains("RTPD_WAL "));
        assert!(api.contains("OTEL_EXPORTER_OTLP_ENDPOINT"), "{api}");
        assert!(!produce.contains("OTEL_"), "{produce}");
    }
}
