//! Configuration: defaults, then an optional TOML file (`RTPD_CONFIG_FILE`),
//! then `RTPD_*` environment variables. Everything is typed and validated
//! before anything starts; errors name the variable.

use figment::{
    Figment,
    providers::{Env, Format, Serialized, Toml},
};
use ipnet::IpNet;
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::{
    fmt,
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    str::FromStr,
    time::Duration,
};

/// Every environment variable `rtpd` reads. `rtpd config --env-names` prints
/// this list; deployment checks compare compose and Bicep against it.
pub const ENV_NAMES: &[&str] = &[
    "RTPD_CONFIG_FILE",
    "RTPD_HTTP_ADDR",
    "RTPD_DATA_DIR",
    "RTPD_INSTANCE_ID",
    "RTPD_LOG_FORMAT",
    "RTPD_LOG_LEVEL",
    "RTPD_WAL",
    "RTPD_STORAGE_CONNECTION_STRING",
    "RTPD_STORAGE_ACCOUNT_URL",
    "RTPD_WAL_CONTAINER",
    "RTPD_WAL_CREATE_CONTAINER",
    "RTPD_WAL_BATCH_MAX_RECORDS",
    "RTPD_WAL_FLUSHERS",
    "RTPD_AZURE_CLIENT_ID",
    "RTPD_LEDGER",
    "RTPD_REDIS_URL",
    "RTPD_REDIS_KEY_PREFIX",
    "RTPD_REDIS_ENTRA",
    "RTPD_LEDGER_RETENTION_DAYS",
    "RTPD_WAL_RETENTION_DAYS",
    "RTPD_POSTGRES_URL",
    "RTPD_POSTGRES_ENTRA",
    "RTPD_POSTGRES_PAYLOAD",
    "RTPD_QUEUE",
    "RTPD_SERVICEBUS_CONNECTION_STRING",
    "RTPD_SERVICEBUS_NAMESPACE",
    "RTPD_SERVICEBUS_QUEUE",
    "RTPD_SERVICEBUS_TRANSPORT",
    "RTPD_SERVICEBUS_CUSTOM_ENDPOINT",
    "RTPD_SERVICEBUS_CA_FILE",
    "RTPD_SERVICEBUS_SEND_TIMEOUT_SECS",
    "RTPD_DOWNSTREAM_URL",
    "RTPD_DOWNSTREAM_TIMEOUT_SECS",
    "RTPD_MAX_RETRIES",
    "RTPD_BACKOFF_BASE_SECS",
    "RTPD_BACKOFF_MAX_SECS",
    "RTPD_PROCESSOR_CONCURRENCY",
    "RTPD_LOCK_DURATION_SECS",
    "RTPD_MAX_DELIVERY_COUNT",
    "RTPD_MAX_BODY_BYTES",
    "RTPD_RECONCILE_INTERVAL_SECS",
    "RTPD_RECOVERY_PROBE_SECS",
    "RTPD_RECONCILE_LOOKBACK_SECS",
    "RTPD_RECONCILE_PENDING_AFTER_SECS",
    "RTPD_AUTH",
    "RTPD_VENDOR_KEYS",
    "RTPD_VENDOR_KEYS_FILE",
    "RTPD_ADMIN_TOKENS",
    "RTPD_ADMIN_TOKENS_FILE",
    "RTPD_PUBLIC_HEALTH",
    "RTPD_PUBLIC_METRICS",
    "RTPD_CREDENTIALS_POLL_SECS",
    "RTPD_SIGNATURE_WINDOW_SECS",
    "RTPD_MAX_HEADER_BYTES",
    "RTPD_REQUEST_TIMEOUT_SECS",
    "RTPD_VENDOR_RATE_PER_SEC",
    "RTPD_VENDOR_RATE_BURST",
    "RTPD_MAX_IN_FLIGHT",
    "RTPD_MAX_IN_FLIGHT_UNAUTHENTICATED",
    "RTPD_UNAUTHENTICATED_RATE_PER_SEC",
    "RTPD_UNAUTHENTICATED_RATE_BURST",
    "RTPD_MAX_UNVERIFIED_PER_SOURCE",
    "RTPD_TRUSTED_PROXIES",
    "RTPD_TRUSTED_PROXY_HOPS",
    "RTPD_CONSOLE",
    "RTPD_CONSOLE_REDACT",
    "RTPD_KAFKA_BOOTSTRAP_SERVERS",
    "RTPD_KAFKA_TOPICS",
    "RTPD_KAFKA_GROUP_ID",
    "RTPD_KAFKA_ID_FROM",
    "RTPD_KAFKA_VENDOR",
    "RTPD_KAFKA_DEAD_LETTER_TOPIC",
    "RTPD_KAFKA_MAX_IN_FLIGHT",
    "RTPD_KAFKA_ENTRA",
];

/// librdkafka properties passed through: `RTPD_KAFKA_CONFIG_SASL_MECHANISM`
/// sets `sasl.mechanism` (the rest of the name in lower case, `_` for `.`).
pub const KAFKA_CONFIG_PREFIX: &str = "RTPD_KAFKA_CONFIG_";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WalKind {
    Local,
    Azure,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LedgerKind {
    Local,
    Redis,
    Postgres,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QueueKind {
    Local,
    Servicebus,
}

/// How rtpd reaches Service Bus: AMQP on 5671, or AMQP over WebSockets on 443.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ServicebusTransport {
    Amqp,
    Websockets,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    Keys,
    None,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

/// A secret that deserializes from any scalar and serializes redacted.
#[derive(Clone, Debug)]
pub struct Secret(pub SecretString);

impl Secret {
    pub fn expose(&self) -> &str {
        self.0.expose_secret()
    }
}

impl From<&str> for Secret {
    fn from(s: &str) -> Self {
        Secret(SecretString::from(s.to_owned()))
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("[redacted]")
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(Secret(SecretString::from(scalar_string(d)?)))
    }
}

/// Environment values are parsed leniently by figment (`"123"` becomes a
/// number), so text settings accept any scalar and keep its text.
fn scalar_string<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Scalar {
        S(String),
        I(i64),
        U(u64),
        F(f64),
        B(bool),
    }
    Ok(match Scalar::deserialize(d)? {
        Scalar::S(s) => s,
        Scalar::I(i) => i.to_string(),
        Scalar::U(u) => u.to_string(),
        Scalar::F(f) => f.to_string(),
        Scalar::B(b) => b.to_string(),
    })
}

/// `RTPD_TRUSTED_PROXIES`: the proxies whose `X-Forwarded-For` names the
/// client, as IP addresses or CIDR ranges, comma separated. Empty: none —
/// the TCP peer is the client and `X-Forwarded-For` is ignored.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustedProxies(Vec<IpNet>);

impl TrustedProxies {
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether `ip` is one of the proxies (an IPv4-mapped IPv6 address is
    /// taken as the IPv4 address it maps).
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.0.iter().any(|net| net.contains(&ip))
    }
}

impl FromStr for TrustedProxies {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        s.split(',')
            .map(str::trim)
            .filter(|entry| !entry.is_empty())
            .map(|entry| {
                let net = entry
                    .parse::<IpNet>()
                    .or_else(|_| entry.parse::<IpAddr>().map(IpNet::from))
                    .map_err(|_| {
                        format!(
                            "{entry:?} is not an IP address or CIDR range (such as 10.0.0.0/16 or fd00::/8)"
                        )
                    })?;
                // Mapped addresses are compared as the IPv4 address they
                // map, so a mapped range would never match.
                if let IpNet::V6(v6) = net
                    && v6.prefix_len() >= 96
                    && v6.network().to_ipv4_mapped().is_some()
                {
                    return Err(format!(
                        "{entry:?} is an IPv4-mapped IPv6 range, which never matches (mapped addresses are compared as IPv4): write the IPv4 address or range"
                    ));
                }
                // Every address in the list may name any client: trusting
                // all of them lets every caller choose its address.
                if net.prefix_len() == 0 {
                    return Err(format!(
                        "{entry:?} trusts every address, so any caller could choose its own; list only the proxies' addresses"
                    ));
                }
                Ok(net.trunc())
            })
            .collect::<Result<_, _>>()
            .map(TrustedProxies)
    }
}

impl fmt::Display for TrustedProxies {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let entries: Vec<String> = self.0.iter().map(IpNet::to_string).collect();
        f.write_str(&entries.join(","))
    }
}

impl Serialize for TrustedProxies {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for TrustedProxies {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        scalar_string(d)?.parse().map_err(serde::de::Error::custom)
    }
}

struct ScalarText(String);

impl<'de> Deserialize<'de> for ScalarText {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        scalar_string(d).map(ScalarText)
    }
}

fn opt_scalar_string<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    Option::<ScalarText>::deserialize(d).map(|o| o.map(|t| t.0))
}

/// The longest WAL retention accepted: a hundred years. Beyond it the
/// operator commands' time arithmetic would overflow.
pub const MAX_WAL_RETENTION_DAYS: u32 = 36_500;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    pub http_addr: SocketAddr,
    pub data_dir: PathBuf,
    #[serde(deserialize_with = "opt_scalar_string")]
    pub instance_id: Option<String>,
    pub log_format: LogFormat,
    #[serde(deserialize_with = "scalar_string")]
    pub log_level: String,

    pub wal: WalKind,
    pub storage_connection_string: Option<Secret>,
    pub storage_account_url: Option<String>,
    #[serde(deserialize_with = "scalar_string")]
    pub wal_container: String,
    pub wal_create_container: Option<bool>,
    /// Records per segment at most (1 = one PUT per transaction, the baseline).
    pub wal_batch_max_records: usize,
    /// Segment flushes in flight at once.
    pub wal_flushers: usize,
    #[serde(deserialize_with = "opt_scalar_string")]
    pub azure_client_id: Option<String>,

    pub ledger: LedgerKind,
    pub redis_url: Secret,
    #[serde(deserialize_with = "scalar_string")]
    pub redis_key_prefix: String,
    pub redis_entra: bool,
    pub ledger_retention_days: u32,
    /// `postgresql://…` or `host=… dbname=…`; may carry a password.
    pub postgres_url: Option<Secret>,
    /// Entra ID access tokens as the password (Azure Database for PostgreSQL).
    pub postgres_entra: bool,
    /// Keep a copy of each payload in the ledger (the `payload` column of
    /// the seed's `messages` view); the WAL has it either way.
    pub postgres_payload: bool,

    pub queue: QueueKind,
    pub servicebus_connection_string: Option<Secret>,
    pub servicebus_namespace: Option<String>,
    #[serde(deserialize_with = "scalar_string")]
    pub servicebus_queue: String,
    pub servicebus_transport: ServicebusTransport,
    /// Connect here instead of the namespace host (a gateway or proxy).
    #[serde(deserialize_with = "opt_scalar_string")]
    pub servicebus_custom_endpoint: Option<String>,
    /// PEM file of extra CA certificates to trust for Service Bus TLS.
    pub servicebus_ca_file: Option<PathBuf>,
    /// How long one send may take, waits for a busy service included.
    pub servicebus_send_timeout_secs: f64,

    pub downstream_url: url::Url,
    pub downstream_timeout_secs: f64,
    pub max_retries: u32,
    pub backoff_base_secs: f64,
    pub backoff_max_secs: f64,
    pub processor_concurrency: usize,
    pub lock_duration_secs: f64,
    pub max_delivery_count: u32,
    pub max_body_bytes: usize,
    pub reconcile_interval_secs: f64,
    pub reconcile_lookback_secs: f64,
    pub reconcile_pending_after_secs: f64,
    /// How often the dependencies are probed to notice one returning (and
    /// re-drive at once).
    pub recovery_probe_secs: f64,

    pub auth: AuthMode,
    pub vendor_keys: Option<Secret>,
    pub vendor_keys_file: Option<PathBuf>,
    pub admin_tokens: Option<Secret>,
    pub admin_tokens_file: Option<PathBuf>,
    pub public_health: bool,
    /// `/metrics` and `/status` without auth (else admin only).
    pub public_metrics: bool,
    /// How often the credential files are re-read (0: only on SIGHUP).
    pub credentials_poll_secs: f64,
    /// How far a signed request's timestamp may be from now, either way.
    pub signature_window_secs: u32,
    /// Request line plus headers; larger requests get 431.
    pub max_header_bytes: usize,
    /// Time allowed to receive the request head, and again the body.
    pub request_timeout_secs: f64,
    /// Sustained requests per second per vendor; 0 switches the limit off.
    pub vendor_rate_per_sec: u32,
    /// Requests a vendor may send at once above the sustained rate.
    pub vendor_rate_burst: u32,
    /// Requests handled at once by this process; beyond it, 503.
    pub max_in_flight: usize,
    /// Of those, requests without a credential that checks out before the
    /// body (anonymous, bad key, bad token): their own smaller pool, so
    /// they cannot take the vendors' slots.
    pub max_in_flight_unauthenticated: usize,
    /// Unauthenticated requests per second per source address (IPv4
    /// address, IPv6 /64); 0 switches the limit off.
    pub unauthenticated_rate_per_sec: u32,
    pub unauthenticated_rate_burst: u32,
    /// Signed requests of one source address waiting for their bodies in
    /// the unauthenticated pool; unset: a quarter of that pool.
    pub max_unverified_per_source: Option<usize>,
    /// Proxies whose `X-Forwarded-For` names the client that the limits
    /// per source address key on (`api::client_addr`).
    pub trusted_proxies: TrustedProxies,
    /// How many proxies stand in front of rtpd, each appending to
    /// `X-Forwarded-For`: the client is the entry that many from the right
    /// (1: Container Apps' Envoy). 0: walk from the right past every
    /// trusted address instead.
    pub trusted_proxy_hops: u32,
    /// The operations console at `/console` (admin token required).
    pub console: bool,
    /// Payload fields the console shows redacted, comma separated, by name
    /// at any depth; `none` shows payloads as stored.
    #[serde(deserialize_with = "scalar_string")]
    pub console_redact: String,
    /// How far back the WAL is kept (the storage lifecycle rule); operator
    /// time ranges that reach further back are refused.
    pub wal_retention_days: u32,

    /// Kafka brokers (`host:port,…`); the Kafka intake needs them.
    #[serde(deserialize_with = "opt_scalar_string")]
    pub kafka_bootstrap_servers: Option<String>,
    /// Topics the Kafka intake consumes, comma separated. Set: `rtpd
    /// serve`, `api` and `dev` run the intake too; `rtpd kafka-intake` runs
    /// only it.
    #[serde(deserialize_with = "opt_scalar_string")]
    pub kafka_topics: Option<String>,
    #[serde(deserialize_with = "scalar_string")]
    pub kafka_group_id: String,
    /// `key`, `header:<name>` or `field:<name>`.
    #[serde(deserialize_with = "scalar_string")]
    pub kafka_id_from: String,
    /// The vendor the records' ids belong to (keys `<vendor>/<id>`, as an
    /// authenticated vendor's POSTs); unset: ids as they are.
    #[serde(deserialize_with = "opt_scalar_string")]
    pub kafka_vendor: Option<String>,
    #[serde(deserialize_with = "scalar_string")]
    pub kafka_dead_letter_topic: String,
    /// Records in intake at once; beyond it the partitions are paused.
    pub kafka_max_in_flight: usize,
    /// SASL/OAUTHBEARER with Entra ID tokens (Event Hubs' Kafka endpoint).
    pub kafka_entra: bool,
    /// `RTPD_KAFKA_CONFIG_*`, as librdkafka properties (read from the
    /// environment only; shown by `rtpd config` when there are any).
    #[serde(skip_deserializing, skip_serializing_if = "KafkaProperties::is_empty")]
    pub kafka_config: KafkaProperties,
}

/// librdkafka properties from `RTPD_KAFKA_CONFIG_*` (values of names that
/// look secret are shown redacted).
#[derive(Debug, Clone, Default)]
pub struct KafkaProperties(pub std::collections::BTreeMap<String, Secret>);

impl KafkaProperties {
    /// From the environment: each `RTPD_KAFKA_CONFIG_<NAME>`.
    pub fn from_env(vars: impl Iterator<Item = (String, String)>) -> KafkaProperties {
        KafkaProperties(
            vars.filter_map(|(k, v)| {
                let name = k.strip_prefix(KAFKA_CONFIG_PREFIX)?;
                (!name.is_empty()).then(|| {
                    (
                        name.to_ascii_lowercase().replace('_', "."),
                        Secret::from(v.as_str()),
                    )
                })
            })
            .collect(),
        )
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn is_secret(name: &str) -> bool {
        ["password", "secret", "key", "token", "jaas"]
            .iter()
            .any(|w| name.contains(w))
    }
}

impl Serialize for KafkaProperties {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = s.serialize_map(Some(self.0.len()))?;
        for (k, v) in &self.0 {
            let shown = if Self::is_secret(k) {
                "[redacted]"
            } else {
                v.expose()
            };
            m.serialize_entry(k, shown)?;
        }
        m.end()
    }
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            http_addr: ([127, 0, 0, 1], 8080).into(),
            data_dir: PathBuf::from("./.rtpd"),
            instance_id: None,
            log_format: LogFormat::Text,
            log_level: "info".into(),
            wal: WalKind::Local,
            storage_connection_string: None,
            storage_account_url: None,
            wal_container: "rtp-wal".into(),
            wal_create_container: None,
            wal_batch_max_records: 2048,
            wal_flushers: 2,
            azure_client_id: None,
            ledger: LedgerKind::Local,
            redis_url: Secret::from("redis://127.0.0.1:6379"),
            redis_key_prefix: "rtpd".into(),
            redis_entra: false,
            ledger_retention_days: 30,
            postgres_url: None,
            postgres_entra: false,
            postgres_payload: false,
            queue: QueueKind::Local,
            servicebus_connection_string: None,
            servicebus_namespace: None,
            servicebus_queue: "rtp-transactions".into(),
            servicebus_transport: ServicebusTransport::Amqp,
            servicebus_custom_endpoint: None,
            servicebus_ca_file: None,
            servicebus_send_timeout_secs: 60.0,
            downstream_url: url::Url::parse("http://127.0.0.1:8081/process")
                .expect("constant URL parses"),
            downstream_timeout_secs: 10.0,
            max_retries: 5,
            backoff_base_secs: 60.0,
            backoff_max_secs: 3600.0,
            processor_concurrency: 64,
            lock_duration_secs: 60.0,
            max_delivery_count: 10,
            max_body_bytes: 256 * 1024,
            reconcile_interval_secs: 60.0,
            reconcile_lookback_secs: 3600.0,
            reconcile_pending_after_secs: 300.0,
            recovery_probe_secs: 1.0,
            auth: AuthMode::Keys,
            vendor_keys: None,
            vendor_keys_file: None,
            admin_tokens: None,
            admin_tokens_file: None,
            public_health: true,
            public_metrics: false,
            credentials_poll_secs: 5.0,
            signature_window_secs: 300,
            max_header_bytes: 16 * 1024,
            request_timeout_secs: 10.0,
            vendor_rate_per_sec: 2000,
            vendor_rate_burst: 4000,
            max_in_flight: 1024,
            max_in_flight_unauthenticated: 64,
            unauthenticated_rate_per_sec: 20,
            unauthenticated_rate_burst: 40,
            max_unverified_per_source: None,
            trusted_proxies: TrustedProxies::default(),
            trusted_proxy_hops: 0,
            wal_retention_days: 400,
            console: true,
            console_redact: crate::console::redact::DEFAULT_FIELDS.into(),
            kafka_bootstrap_servers: None,
            kafka_topics: None,
            kafka_group_id: "rtpd".into(),
            kafka_id_from: "field:transaction_id".into(),
            kafka_vendor: None,
            kafka_dead_letter_topic: "rtpd-dead-letter".into(),
            kafka_max_in_flight: 1000,
            kafka_entra: false,
            kafka_config: KafkaProperties::default(),
        }
    }
}

/// A configuration problem, always naming the variable.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration: {variable}: {message}")]
pub struct ConfigError {
    pub variable: String,
    pub message: String,
}

impl ConfigError {
    pub fn new(variable: &str, message: impl Into<String>) -> Self {
        ConfigError {
            variable: variable.to_owned(),
            message: message.into(),
        }
    }
}

fn env_name(field: &str) -> String {
    format!("RTPD_{}", field.to_ascii_uppercase())
}

impl Settings {
    /// Defaults → `RTPD_CONFIG_FILE` (TOML) → `RTPD_*` variables, validated.
    pub fn load() -> Result<Settings, ConfigError> {
        Self::load_from(Figment::from(Serialized::defaults(Settings::default())))
    }

    /// Like [`Settings::load`] but on top of caller-provided defaults (used by
    /// `rtpd dev`, whose defaults differ).
    pub fn load_from(base: Figment) -> Result<Settings, ConfigError> {
        let mut fig = base;
        if let Ok(path) = std::env::var("RTPD_CONFIG_FILE") {
            if !std::path::Path::new(&path).is_file() {
                return Err(ConfigError::new(
                    "RTPD_CONFIG_FILE",
                    format!("no such file: {path}"),
                ));
            }
            fig = fig.merge(Toml::file(path));
        }
        let names: Vec<String> = ENV_NAMES
            .iter()
            .filter(|n| **n != "RTPD_CONFIG_FILE")
            .map(|n| n.trim_start_matches("RTPD_").to_ascii_lowercase())
            .collect();
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        fig = fig.merge(Env::prefixed("RTPD_").only(&names));
        let mut settings: Settings = fig.extract().map_err(|e| {
            let field = e.path.first().cloned().unwrap_or_else(|| "?".into());
            let from_env = e
                .metadata
                .as_ref()
                .is_some_and(|m| m.name.contains("environment"));
            let variable = if from_env || e.metadata.is_none() {
                env_name(&field)
            } else {
                format!("{field} (in RTPD_CONFIG_FILE)")
            };
            ConfigError::new(&variable, e.kind.to_string())
        })?;
        settings.kafka_config = KafkaProperties::from_env(std::env::vars());
        settings.validate()?;
        Ok(settings)
    }

    /// `RTPD_MAX_UNVERIFIED_PER_SOURCE`, or its default: a quarter of the
    /// unauthenticated pool, so that four forging addresses are needed to
    /// fill it, and a vouched signer does not wait in it at all.
    pub fn unverified_per_source(&self) -> usize {
        self.max_unverified_per_source
            .unwrap_or(self.max_in_flight_unauthenticated / 4)
            .max(1)
    }

    /// `RTPD_KAFKA_TOPICS` as a list (empty: no Kafka intake).
    pub fn kafka_topic_list(&self) -> Vec<String> {
        self.kafka_topics
            .as_deref()
            .unwrap_or("")
            .split(',')
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .map(str::to_owned)
            .collect()
    }

    /// Whether the Kafka intake runs (`RTPD_KAFKA_TOPICS` names a topic).
    pub fn kafka_enabled(&self) -> bool {
        !self.kafka_topic_list().is_empty()
    }

    fn validate_kafka(&self) -> Result<(), ConfigError> {
        if !self.kafka_enabled() {
            return Ok(());
        }
        if !cfg!(feature = "kafka") {
            return Err(ConfigError::new(
                "RTPD_KAFKA_TOPICS",
                "this rtpd was built without the kafka feature (cargo build --features kafka)",
            ));
        }
        if self
            .kafka_bootstrap_servers
            .as_deref()
            .is_none_or(|s| s.trim().is_empty())
        {
            return Err(ConfigError::new(
                "RTPD_KAFKA_BOOTSTRAP_SERVERS",
                "must be set when RTPD_KAFKA_TOPICS is (host:port, comma separated)",
            ));
        }
        if let Err(e) = self.kafka_id_from.parse::<crate::kafka::record::IdFrom>() {
            return Err(ConfigError::new("RTPD_KAFKA_ID_FROM", e));
        }
        if let Some(t) = self.kafka_topic_list().iter().find(|t| t.starts_with('^')) {
            return Err(ConfigError::new(
                "RTPD_KAFKA_TOPICS",
                format!(
                    "{t:?} is a pattern; name the topics (a pattern could take in the dead-letter topic)"
                ),
            ));
        }
        self.validate_kafka_properties()?;
        if self.kafka_group_id.trim().is_empty() {
            return Err(ConfigError::new("RTPD_KAFKA_GROUP_ID", "must not be empty"));
        }
        if self.kafka_dead_letter_topic.trim().is_empty()
            || self
                .kafka_topic_list()
                .contains(&self.kafka_dead_letter_topic)
        {
            return Err(ConfigError::new(
                "RTPD_KAFKA_DEAD_LETTER_TOPIC",
                "must name a topic (no spaces) that is not one of RTPD_KAFKA_TOPICS",
            ));
        }
        if let Some(v) = &self.kafka_vendor
            && crate::transaction::TransactionId::scoped(
                Some(v),
                &crate::transaction::TransactionId::parse("x").expect("a valid id"),
            )
            .is_err()
        {
            return Err(ConfigError::new(
                "RTPD_KAFKA_VENDOR",
                format!("{v:?} is not a vendor name (letters, digits, . _ : -)"),
            ));
        }
        if self.kafka_max_in_flight == 0 {
            return Err(ConfigError::new(
                "RTPD_KAFKA_MAX_IN_FLIGHT",
                "must be at least 1",
            ));
        }
        Ok(())
    }

    /// `RTPD_KAFKA_CONFIG_*`: no property the intake's guarantee rests on
    /// (those are set by the intake or by their own `RTPD_KAFKA_*`
    /// variable), and each one librdkafka knows with a value it takes.
    fn validate_kafka_properties(&self) -> Result<(), ConfigError> {
        let variable = |name: &str| {
            format!(
                "{KAFKA_CONFIG_PREFIX}{}",
                name.to_ascii_uppercase().replace('.', "_")
            )
        };
        for (name, value) in &self.kafka_config.0 {
            // librdkafka takes a topic property under `topic.<name>` too,
            // and some properties under an older name.
            let canonical = match name.strip_prefix("topic.").unwrap_or(name) {
                "metadata.broker.list" => "bootstrap.servers",
                "auto.commit.enable" => "enable.auto.commit",
                "request.required.acks" => "acks",
                other => other,
            };
            let v = value.expose().trim().to_ascii_lowercase();
            // A value the intake sets itself is fine; any other is not.
            let why = match canonical {
                "enable.auto.commit" | "enable.auto.offset.store" if v != "false" => {
                    Some("the intake commits offsets itself, only past durable records")
                }
                "auto.offset.reset"
                    if !matches!(v.as_str(), "earliest" | "smallest" | "beginning") =>
                {
                    Some(
                        "only earliest: a new group must not skip the records already in the topics",
                    )
                }
                "enable.partition.eof" if v != "false" => {
                    Some("the intake reads partitions endlessly")
                }
                "isolation.level" if v != "read_committed" => Some(
                    "only read_committed: a record of an aborted producer transaction is no payment",
                ),
                // The dead-letter producer's: a record counts as set aside
                // only once every in-sync replica has it.
                "acks" if !matches!(v.as_str(), "all" | "-1") => Some(
                    "only all: a dead letter counts as set aside once every in-sync replica has it",
                ),
                "enable.idempotence" if v != "true" => {
                    Some("the dead-letter producer is idempotent")
                }
                "transactional.id" => Some("the dead-letter producer is not transactional"),
                "bootstrap.servers" => Some("set RTPD_KAFKA_BOOTSTRAP_SERVERS"),
                "group.id" => Some("set RTPD_KAFKA_GROUP_ID"),
                "security.protocol" | "sasl.mechanism" | "sasl.mechanisms" if self.kafka_entra => {
                    Some("RTPD_KAFKA_ENTRA=true sets SASL_SSL and OAUTHBEARER")
                }
                // rtpd answers librdkafka's token refreshes itself (Entra).
                "sasl.oauthbearer.method" | "sasl.oauthbearer.config" => Some(
                    "OAUTHBEARER tokens come from Entra ID (RTPD_KAFKA_ENTRA=true); otherwise use SASL PLAIN or SCRAM",
                ),
                _ => None,
            };
            if let Some(why) = why {
                return Err(ConfigError::new(
                    &variable(name),
                    format!("not settable: {why}"),
                ));
            }
            #[cfg(feature = "kafka")]
            if let Err(e) = rdkafka::ClientConfig::new()
                .set(name, value.expose())
                .create_native_config()
            {
                return Err(ConfigError::new(&variable(name), e.to_string()));
            }
        }
        Ok(())
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        self.validate_kafka()?;
        if let Some(bad) = self.console_redact.split(',').map(str::trim).find(|f| {
            !f.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | '$'))
        }) {
            return Err(ConfigError::new(
                "RTPD_CONSOLE_REDACT",
                format!(
                    "{bad:?} is not a field name: give JSON field names, comma separated (or none)"
                ),
            ));
        }
        let positive = |name: &str, v: f64| {
            if v.is_finite() && v >= 0.0 {
                Ok(())
            } else {
                Err(ConfigError::new(
                    name,
                    format!("must be a non-negative number, got {v}"),
                ))
            }
        };
        positive("RTPD_DOWNSTREAM_TIMEOUT_SECS", self.downstream_timeout_secs)?;
        positive("RTPD_BACKOFF_BASE_SECS", self.backoff_base_secs)?;
        positive("RTPD_BACKOFF_MAX_SECS", self.backoff_max_secs)?;
        positive("RTPD_LOCK_DURATION_SECS", self.lock_duration_secs)?;
        positive("RTPD_RECONCILE_LOOKBACK_SECS", self.reconcile_lookback_secs)?;
        positive(
            "RTPD_RECONCILE_PENDING_AFTER_SECS",
            self.reconcile_pending_after_secs,
        )?;
        if !(self.reconcile_interval_secs.is_finite() && self.reconcile_interval_secs >= 0.1) {
            return Err(ConfigError::new(
                "RTPD_RECONCILE_INTERVAL_SECS",
                "must be at least 0.1",
            ));
        }
        if !(self.recovery_probe_secs.is_finite() && self.recovery_probe_secs >= 0.1) {
            return Err(ConfigError::new(
                "RTPD_RECOVERY_PROBE_SECS",
                "must be at least 0.1",
            ));
        }
        if !(self.servicebus_send_timeout_secs.is_finite()
            && (1.0..=3600.0).contains(&self.servicebus_send_timeout_secs))
        {
            return Err(ConfigError::new(
                "RTPD_SERVICEBUS_SEND_TIMEOUT_SECS",
                format!(
                    "must be between 1 and 3600 seconds, got {}",
                    self.servicebus_send_timeout_secs
                ),
            ));
        }
        if self.downstream_timeout_secs <= 0.0 {
            return Err(ConfigError::new(
                "RTPD_DOWNSTREAM_TIMEOUT_SECS",
                "must be greater than 0",
            ));
        }
        if self.lock_duration_secs < 1.0 {
            return Err(ConfigError::new(
                "RTPD_LOCK_DURATION_SECS",
                "must be at least 1 second",
            ));
        }
        if self.backoff_max_secs < self.backoff_base_secs {
            return Err(ConfigError::new(
                "RTPD_BACKOFF_MAX_SECS",
                "must be at least RTPD_BACKOFF_BASE_SECS",
            ));
        }
        if self.wal_batch_max_records == 0 {
            return Err(ConfigError::new(
                "RTPD_WAL_BATCH_MAX_RECORDS",
                "must be at least 1",
            ));
        }
        if self.wal_flushers == 0 || self.wal_flushers > 1024 {
            return Err(ConfigError::new(
                "RTPD_WAL_FLUSHERS",
                "must be between 1 and 1024",
            ));
        }
        if self.processor_concurrency == 0 {
            return Err(ConfigError::new(
                "RTPD_PROCESSOR_CONCURRENCY",
                "must be at least 1",
            ));
        }
        if self.max_delivery_count == 0 {
            return Err(ConfigError::new(
                "RTPD_MAX_DELIVERY_COUNT",
                "must be at least 1",
            ));
        }
        if self.max_body_bytes < 64 || self.max_body_bytes > 64 * 1024 * 1024 {
            return Err(ConfigError::new(
                "RTPD_MAX_BODY_BYTES",
                "must be between 64 bytes and 64 MiB",
            ));
        }
        if !(self.credentials_poll_secs.is_finite()
            && (self.credentials_poll_secs == 0.0
                || (0.1..=86_400.0).contains(&self.credentials_poll_secs)))
        {
            return Err(ConfigError::new(
                "RTPD_CREDENTIALS_POLL_SECS",
                "must be 0 (only on SIGHUP) or between 0.1 and 86400",
            ));
        }
        if !(1..=86_400).contains(&self.signature_window_secs) {
            return Err(ConfigError::new(
                "RTPD_SIGNATURE_WINDOW_SECS",
                "must be between 1 and 86400",
            ));
        }
        // actix closes the connection past 128 KiB of head before we see it.
        if !(1024..=128 * 1024).contains(&self.max_header_bytes) {
            return Err(ConfigError::new(
                "RTPD_MAX_HEADER_BYTES",
                "must be between 1024 and 131072",
            ));
        }
        if !(self.request_timeout_secs.is_finite()
            && (0.1..=600.0).contains(&self.request_timeout_secs))
        {
            return Err(ConfigError::new(
                "RTPD_REQUEST_TIMEOUT_SECS",
                "must be between 0.1 and 600",
            ));
        }
        if self.vendor_rate_per_sec > 0 && self.vendor_rate_burst == 0 {
            return Err(ConfigError::new(
                "RTPD_VENDOR_RATE_BURST",
                "must be at least 1 when RTPD_VENDOR_RATE_PER_SEC is set",
            ));
        }
        if self.max_in_flight == 0 {
            return Err(ConfigError::new("RTPD_MAX_IN_FLIGHT", "must be at least 1"));
        }
        if self.max_in_flight_unauthenticated == 0 {
            return Err(ConfigError::new(
                "RTPD_MAX_IN_FLIGHT_UNAUTHENTICATED",
                "must be at least 1",
            ));
        }
        if self.unauthenticated_rate_per_sec > 0 && self.unauthenticated_rate_burst == 0 {
            return Err(ConfigError::new(
                "RTPD_UNAUTHENTICATED_RATE_BURST",
                "must be at least 1 when RTPD_UNAUTHENTICATED_RATE_PER_SEC is set",
            ));
        }
        if let Some(n) = self.max_unverified_per_source
            && !(1..=self.max_in_flight_unauthenticated).contains(&n)
        {
            return Err(ConfigError::new(
                "RTPD_MAX_UNVERIFIED_PER_SOURCE",
                "must be between 1 and RTPD_MAX_IN_FLIGHT_UNAUTHENTICATED (the unauthenticated pool it is a share of)",
            ));
        }
        if !(1..=MAX_WAL_RETENTION_DAYS).contains(&self.wal_retention_days) {
            return Err(ConfigError::new(
                "RTPD_WAL_RETENTION_DAYS",
                "must be between 1 and 36500 (the days of WAL the storage keeps)",
            ));
        }
        if !matches!(self.downstream_url.scheme(), "http" | "https") {
            return Err(ConfigError::new(
                "RTPD_DOWNSTREAM_URL",
                "must be an http(s) URL",
            ));
        }
        if let Some(id) = &self.instance_id
            && (id.is_empty() || !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'))
        {
            return Err(ConfigError::new(
                "RTPD_INSTANCE_ID",
                "may contain only A-Z a-z 0-9 -",
            ));
        }
        if self.wal == WalKind::Azure
            && self.storage_connection_string.is_none()
            && self.storage_account_url.is_none()
        {
            return Err(ConfigError::new(
                "RTPD_WAL",
                "azure needs RTPD_STORAGE_CONNECTION_STRING or RTPD_STORAGE_ACCOUNT_URL",
            ));
        }
        if let Some(u) = &self.storage_account_url
            && url::Url::parse(u).is_err()
        {
            return Err(ConfigError::new("RTPD_STORAGE_ACCOUNT_URL", "is not a URL"));
        }
        if self.queue == QueueKind::Servicebus
            && self.servicebus_connection_string.is_none()
            && self.servicebus_namespace.is_none()
        {
            return Err(ConfigError::new(
                "RTPD_QUEUE",
                "servicebus needs RTPD_SERVICEBUS_CONNECTION_STRING or RTPD_SERVICEBUS_NAMESPACE",
            ));
        }
        if self.ledger == LedgerKind::Redis {
            let u = self.redis_url.expose();
            if !(u.starts_with("redis://") || u.starts_with("rediss://")) {
                return Err(ConfigError::new(
                    "RTPD_REDIS_URL",
                    "must start with redis:// or rediss://",
                ));
            }
        }
        if self.ledger == LedgerKind::Postgres {
            let Some(u) = &self.postgres_url else {
                return Err(ConfigError::new(
                    "RTPD_POSTGRES_URL",
                    "is required with RTPD_LEDGER=postgres",
                ));
            };
            if let Err(e) = u.expose().parse::<tokio_postgres::Config>() {
                return Err(ConfigError::new(
                    "RTPD_POSTGRES_URL",
                    format!("is not a PostgreSQL connection string: {e}"),
                ));
            }
        }
        Ok(())
    }

    pub fn lock_duration(&self) -> Duration {
        Duration::from_secs_f64(self.lock_duration_secs)
    }

    pub fn secs(v: f64) -> Duration {
        Duration::from_secs_f64(v)
    }

    pub fn request_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.request_timeout_secs)
    }

    pub fn downstream_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.downstream_timeout_secs)
    }

    /// A stable name for this process in lease owners and segment keys.
    pub fn instance(&self) -> String {
        self.instance_id.clone().unwrap_or_else(|| {
            let host = std::env::var("HOSTNAME")
                .ok()
                .filter(|h| {
                    !h.is_empty() && h.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                })
                .unwrap_or_else(|| "rtpd".into());
            format!("{host}-{}", std::process::id())
        })
    }

    /// The effective configuration, one `RTPD_NAME = value` line each, secrets redacted.
    pub fn to_redacted_toml(&self) -> String {
        toml_string(self)
    }
}

fn toml_string(s: &Settings) -> String {
    let mut out = String::new();
    if let Ok(serde_json::Value::Object(map)) = serde_json::to_value(s) {
        for (k, v) in map {
            let rendered = match v {
                // Unset, but with a default computed from other settings:
                // show what applies.
                serde_json::Value::Null if k == "max_unverified_per_source" => {
                    format!(
                        "{} (default: a quarter of RTPD_MAX_IN_FLIGHT_UNAUTHENTICATED)",
                        s.unverified_per_source()
                    )
                }
                serde_json::Value::Null => "(unset)".to_owned(),
                other => other.to_string(),
            };
            out.push_str(&format!("{} = {rendered}\n", env_name(&k)));
        }
    }
    out
}

#[cfg(test)]
#[allow(clippy::result_large_err)] // figment::Jail's closure signature
mod tests {

    #[test]
    fn kafka_settings_that_would_break_the_guarantee_are_refused_naming_the_variable() {
        let base = || Settings {
            kafka_topics: Some("payments".into()),
            kafka_bootstrap_servers: Some("kafka:9092".into()),
            ..Settings::default()
        };
        base().validate().unwrap();
        let refused = |s: Settings| s.validate().unwrap_err().variable;
        let with = |name: &str, value: &str| Settings {
            kafka_config: KafkaProperties::from_env(
                [(format!("RTPD_KAFKA_CONFIG_{name}"), value.to_owned())].into_iter(),
            ),
            ..base()
        };
        assert_eq!(
            refused(Settings {
                kafka_topics: Some("^pay.*".into()),
                ..base()
            }),
            "RTPD_KAFKA_TOPICS"
        );
        assert_eq!(
            refused(Settings {
                kafka_bootstrap_servers: None,
                ..base()
            }),
            "RTPD_KAFKA_BOOTSTRAP_SERVERS"
        );
        assert_eq!(
            refused(Settings {
                kafka_dead_letter_topic: "payments".into(),
                ..base()
            }),
            "RTPD_KAFKA_DEAD_LETTER_TOPIC"
        );
        assert_eq!(
            refused(Settings {
                kafka_id_from: "value".into(),
                ..base()
            }),
            "RTPD_KAFKA_ID_FROM"
        );
        for (name, value) in [
            ("ENABLE_AUTO_COMMIT", "true"),
            ("ENABLE_AUTO_OFFSET_STORE", "true"),
            ("AUTO_OFFSET_RESET", "latest"),
            ("GROUP_ID", "other"),
            ("BOOTSTRAP_SERVERS", "elsewhere:9092"),
            ("METADATA_BROKER_LIST", "elsewhere:9092"),
            ("TOPIC_AUTO_OFFSET_RESET", "latest"),
            ("AUTO_COMMIT_ENABLE", "true"),
            ("SASL_OAUTHBEARER_METHOD", "oidc"),
            ("ACKS", "0"),
            ("TOPIC_REQUEST_REQUIRED_ACKS", "1"),
            ("ENABLE_IDEMPOTENCE", "false"),
            ("TRANSACTIONAL_ID", "t"),
            ("ISOLATION_LEVEL", "read_uncommitted"),
            ("NO_SUCH_PROPERTY", "1"),
        ] {
            assert_eq!(
                refused(with(name, value)),
                format!("RTPD_KAFKA_CONFIG_{name}"),
                "{name}={value}"
            );
        }
        with("AUTO_OFFSET_RESET", "earliest").validate().unwrap();
        with("TOPIC_AUTO_OFFSET_RESET", "Earliest")
            .validate()
            .unwrap();
        with("SESSION_TIMEOUT_MS", "6000").validate().unwrap();
    }

    use super::*;

    #[test]
    fn the_shown_configuration_gives_computed_defaults() {
        let s = Settings::default();
        let shown = s.to_redacted_toml();
        let line = shown
            .lines()
            .find(|l| l.starts_with("RTPD_MAX_UNVERIFIED_PER_SOURCE = "))
            .unwrap();
        assert!(
            line.contains(&format!("= {} (default", s.unverified_per_source())),
            "{line}"
        );
    }

    #[test]
    fn every_field_has_an_env_name() {
        let value = serde_json::to_value(Settings::default()).unwrap();
        for key in value.as_object().unwrap().keys() {
            let name = env_name(key);
            assert!(
                ENV_NAMES.contains(&name.as_str()),
                "{name} missing from ENV_NAMES"
            );
        }
    }

    #[test]
    fn bad_values_name_the_variable() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("RTPD_CONSOLE", "perhaps");
            let err = Settings::load().unwrap_err();
            assert_eq!(err.variable, "RTPD_CONSOLE");
            jail.set_env("RTPD_CONSOLE", "false");
            jail.set_env("RTPD_CONSOLE_REDACT", "iban,<script>");
            let err = Settings::load().unwrap_err();
            assert_eq!(err.variable, "RTPD_CONSOLE_REDACT", "{err}");
            jail.set_env("RTPD_CONSOLE_REDACT", "iban, routing_number");
            let s = Settings::load().unwrap();
            assert!(!s.console);
            assert_eq!(s.console_redact, "iban, routing_number");
            Ok(())
        });
        figment::Jail::expect_with(|jail| {
            jail.set_env("RTPD_MAX_RETRIES", "lots");
            let err = Settings::load().unwrap_err();
            assert_eq!(err.variable, "RTPD_MAX_RETRIES");
            Ok(())
        });
        figment::Jail::expect_with(|jail| {
            jail.set_env("RTPD_WAL", "s3");
            let err = Settings::load().unwrap_err();
            assert_eq!(err.variable, "RTPD_WAL");
            Ok(())
        });
        figment::Jail::expect_with(|jail| {
            jail.set_env("RTPD_BACKOFF_BASE_SECS", "100");
            jail.set_env("RTPD_BACKOFF_MAX_SECS", "10");
            let err = Settings::load().unwrap_err();
            assert_eq!(err.variable, "RTPD_BACKOFF_MAX_SECS");
            Ok(())
        });
        for (name, value) in [
            ("RTPD_SIGNATURE_WINDOW_SECS", "0"),
            ("RTPD_MAX_HEADER_BYTES", "10"),
            ("RTPD_REQUEST_TIMEOUT_SECS", "0"),
            ("RTPD_VENDOR_RATE_BURST", "0"),
            ("RTPD_MAX_IN_FLIGHT", "0"),
            ("RTPD_CREDENTIALS_POLL_SECS", "0.01"),
            ("RTPD_VENDOR_RATE_PER_SEC", "-1"),
            ("RTPD_WAL_RETENTION_DAYS", "0"),
            ("RTPD_WAL_RETENTION_DAYS", "100000000"),
            ("RTPD_MAX_UNVERIFIED_PER_SOURCE", "0"),
            ("RTPD_MAX_UNVERIFIED_PER_SOURCE", "65"),
        ] {
            figment::Jail::expect_with(|jail| {
                jail.set_env(name, value);
                let err = Settings::load().unwrap_err();
                assert_eq!(err.variable, name);
                Ok(())
            });
        }
    }

    #[test]
    fn trusted_proxies_are_addresses_or_ranges_and_a_bad_one_is_named() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("RTPD_TRUSTED_PROXIES", "10.0.0.0/16, 192.0.2.7,fd00::/8,");
            let s = Settings::load().unwrap();
            let t = &s.trusted_proxies;
            assert!(t.contains("10.0.255.1".parse().unwrap()));
            assert!(t.contains("::ffff:10.0.0.9".parse().unwrap()));
            assert!(t.contains("192.0.2.7".parse().unwrap()));
            assert!(!t.contains("192.0.2.8".parse().unwrap()));
            assert!(t.contains("fd12::1".parse().unwrap()));
            assert!(!t.contains("2001:db8::1".parse().unwrap()));
            let printed = s.to_redacted_toml();
            assert!(
                printed.contains("RTPD_TRUSTED_PROXIES = \"10.0.0.0/16,192.0.2.7/32,fd00::/8\""),
                "{printed}"
            );
            Ok(())
        });
        figment::Jail::expect_with(|_jail| {
            assert!(Settings::load().unwrap().trusted_proxies.0.is_empty());
            Ok(())
        });
        for bad in [
            "10.0.0.0/33",
            "envoy",
            "10.0.0.1:80",
            "fd00::/129",
            "0.0.0.0/0",
            "::/0",
            "::ffff:10.0.0.0/104",
        ] {
            figment::Jail::expect_with(|jail| {
                jail.set_env("RTPD_TRUSTED_PROXIES", format!("10.0.0.0/16,{bad}"));
                let err = Settings::load().unwrap_err();
                assert_eq!(err.variable, "RTPD_TRUSTED_PROXIES");
                assert!(err.to_string().contains(&format!("\"{bad}\"")), "{err}");
                Ok(())
            });
        }
    }

    #[test]
    fn numeric_text_and_secrets_are_kept_and_redacted() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("RTPD_INSTANCE_ID", "42");
            jail.set_env("RTPD_VENDOR_KEYS", "12345");
            jail.set_env("RTPD_MAX_RETRIES", "3");
            let s = Settings::load().unwrap();
            assert_eq!(s.instance_id.as_deref(), Some("42"));
            assert_eq!(s.vendor_keys.as_ref().unwrap().expose(), "12345");
            assert_eq!(s.max_retries, 3);
            let printed = s.to_redacted_toml();
            assert!(
                printed.contains("RTPD_VENDOR_KEYS = \"[redacted]\""),
                "{printed}"
            );
            assert!(!printed.contains("12345"));
            Ok(())
        });
    }
}
