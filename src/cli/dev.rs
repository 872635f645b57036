//! `rtpd dev`: the whole pipeline in one process on embedded backends with a
//! mock downstream, data under `./.rtpd`. Zero setup: it generates a vendor
//! API key, a vendor HMAC signing secret and an admin token (kept in the data
//! directory, so a restart keeps them) and prints how to use them.

use super::mock::Opts as MockOpts;
use super::serve::{Parts, run_with};
use crate::auth::{Auth, hash_secret};
use crate::config::{AuthMode, LedgerKind, QueueKind, Secret, Settings, WalKind};
use crate::mock_downstream::Mock;
use anyhow::Context;
use rand::RngExt;
use serde::{Deserialize, Serialize};
use std::{
    net::TcpListener,
    path::{Path, PathBuf},
};

#[derive(Debug, clap::Args)]
pub struct Opts {
    /// Address of the mock downstream
    #[arg(long, default_value = "127.0.0.1:8081")]
    pub mock_addr: String,
    /// Mock success rate (the seed's mock uses 0.8)
    #[arg(long, default_value_t = 0.8)]
    pub mock_success_rate: f64,
    /// Mock latency per call, in milliseconds
    #[arg(long, default_value_t = 0)]
    pub mock_latency_ms: u64,
    /// Mock failure mix, e.g. 503=5,429=2,400=1,hang=1
    #[arg(long, default_value = "503=5,429=2,400=1,hang=1")]
    pub mock_failure_mix: String,
    /// Use RTPD_DOWNSTREAM_URL instead of starting the mock
    #[arg(long)]
    pub no_mock: bool,
    /// Export traces and metrics over OTLP/HTTP to this collector, e.g.
    /// http://127.0.0.1:4318 (instead of the OTEL_EXPORTER_OTLP_* variables)
    #[arg(long, value_name = "URL")]
    pub otlp: Option<String>,
    /// Start an embedded Kafka broker (librdkafka's mock cluster: in memory,
    /// gone at exit) with a `transactions` topic, and take transactions from
    /// it as from the API (RTPD_KAFKA_BOOTSTRAP_SERVERS points elsewhere)
    #[cfg(feature = "kafka")]
    #[arg(long)]
    pub kafka: bool,
}

/// The topic `rtpd dev --kafka` creates and consumes.
#[cfg(feature = "kafka")]
pub const DEV_KAFKA_TOPIC: &str = "transactions";

/// `rtpd dev --kafka`: an in-memory broker with the intake's topics, and
/// the settings that point the intake at it (the dev vendor's, so its API
/// key reads the transactions back).
#[cfg(feature = "kafka")]
fn embedded_kafka(
    settings: &mut Settings,
    vendor: &str,
) -> anyhow::Result<rdkafka::mocking::MockCluster<'static, rdkafka::producer::DefaultProducerContext>>
{
    let cluster =
        rdkafka::mocking::MockCluster::new(1).context("starting the embedded Kafka broker")?;
    if settings.kafka_topics.is_none() {
        settings.kafka_topics = Some(DEV_KAFKA_TOPIC.into());
    }
    for topic in settings.kafka_topic_list() {
        cluster
            .create_topic(&topic, 3, 1)
            .with_context(|| format!("creating topic {topic}"))?;
    }
    cluster
        .create_topic(&settings.kafka_dead_letter_topic, 1, 1)
        .context("creating the dead-letter topic")?;
    settings.kafka_bootstrap_servers = Some(cluster.bootstrap_servers());
    if settings.kafka_vendor.is_none() && settings.auth != AuthMode::None {
        settings.kafka_vendor = Some(vendor.to_owned());
    }
    settings.validate()?;
    Ok(cluster)
}

#[derive(Serialize, Deserialize)]
pub struct DevCredentials {
    pub vendor: String,
    pub api_key: String,
    pub admin_token: String,
    /// A second vendor that signs its requests (added later: absent in old files).
    #[serde(default)]
    pub hmac_vendor: String,
    #[serde(default)]
    pub hmac_secret: String,
}

fn random_secret(prefix: &str) -> String {
    let bytes: [u8; 24] = rand::rng().random();
    format!("{prefix}_{}", hex::encode(bytes))
}

/// Loads the dev credentials from the data directory, creating them once.
pub fn dev_credentials(data_dir: &Path) -> anyhow::Result<DevCredentials> {
    let path = data_dir.join("dev-credentials.json");
    let mut creds = match std::fs::read_to_string(&path) {
        Ok(text) => serde_json::from_str::<DevCredentials>(&text)
            .with_context(|| format!("reading {}", path.display()))?,
        Err(_) => DevCredentials {
            vendor: "dev-vendor".into(),
            api_key: random_secret("rtpd_vk"),
            admin_token: random_secret("rtpd_adm"),
            hmac_vendor: String::new(),
            hmac_secret: String::new(),
        },
    };
    if creds.hmac_secret.is_empty() {
        creds.hmac_vendor = "dev-signer".into();
        creds.hmac_secret = random_secret("rtpd_hs");
        std::fs::create_dir_all(data_dir)?;
        write_private(&path, &serde_json::to_vec_pretty(&creds)?)?;
    }
    // Files written by earlier versions were world-readable.
    restrict(&path)?;
    Ok(creds)
}

/// Writes a file only its owner may read: created 0600, so the secrets are
/// never readable by others, not even for a moment.
fn write_private(path: &Path, content: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut f = options
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    f.write_all(content)
        .with_context(|| format!("writing {}", path.display()))?;
    restrict(path)
}

/// 0600 on an existing file (`mode` above applies only on creation).
fn restrict(path: &Path) -> anyhow::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .with_context(|| format!("restricting {} to its owner", path.display()))?;
    }
    #[cfg(not(unix))]
    let _ = path;
    Ok(())
}

/// The vendor credentials file `rtpd dev` points `RTPD_VENDOR_KEYS_FILE` at:
/// HMAC secrets are accepted only from a file, as in production.
fn write_vendor_keys_file(data_dir: &Path, creds: &DevCredentials) -> anyhow::Result<PathBuf> {
    let path = data_dir.join("dev-vendor-keys");
    let text = format!(
        "# written by rtpd dev\n{}:sha256:{}\n{}:hmac:{}\n",
        creds.vendor,
        hash_secret(&creds.api_key),
        creds.hmac_vendor,
        creds.hmac_secret
    );
    write_private(&path, text.as_bytes())?;
    Ok(path)
}

pub async fn run(opts: Opts) -> anyhow::Result<()> {
    let mut settings = Settings::load()?;
    // A developer's load tests should measure the pipeline, not the limiter.
    if std::env::var_os("RTPD_VENDOR_RATE_PER_SEC").is_none() {
        settings.vendor_rate_per_sec = 0;
    }
    // Counts on a developer's own machine: /metrics and /status stay open
    // (as the banner's curl line shows) unless set otherwise.
    if std::env::var_os("RTPD_PUBLIC_METRICS").is_none() {
        settings.public_metrics = true;
    }
    for (kind, name) in [
        (settings.wal != WalKind::Local, "RTPD_WAL"),
        (settings.ledger != LedgerKind::Local, "RTPD_LEDGER"),
        (settings.queue != QueueKind::Local, "RTPD_QUEUE"),
    ] {
        if kind {
            tracing::info!(
                "{name} is set: rtpd dev uses the configured backend instead of the embedded one"
            );
        }
    }

    let mut mock_server = None;
    if !opts.no_mock {
        let mock_opts = MockOpts {
            addr: opts.mock_addr.clone(),
            success_rate: opts.mock_success_rate,
            latency_ms: opts.mock_latency_ms,
            failure_mix: opts.mock_failure_mix.clone(),
            hang_secs: 60,
        }
        .options()?;
        let listener = TcpListener::bind(&opts.mock_addr).with_context(|| {
            format!(
                "binding the mock downstream on {} (use --mock-addr)",
                opts.mock_addr
            )
        })?;
        let (server, port) = Mock::new(mock_opts).serve(listener)?;
        let host = opts
            .mock_addr
            .rsplit_once(':')
            .map(|(h, _)| h)
            .unwrap_or("127.0.0.1");
        settings.downstream_url = url::Url::parse(&format!("http://{host}:{port}/process"))?;
        mock_server = Some(server);
    }

    let creds = dev_credentials(&settings.data_dir)?;
    #[cfg(feature = "kafka")]
    let _kafka = if opts.kafka {
        Some(embedded_kafka(&mut settings, &creds.vendor)?)
    } else {
        None
    };
    let auth = if settings.auth == AuthMode::None {
        tracing::warn!("RTPD_AUTH=none: the API accepts unauthenticated requests");
        Auth::disabled()
    } else {
        settings.vendor_keys = None;
        settings.vendor_keys_file = Some(write_vendor_keys_file(&settings.data_dir, &creds)?);
        settings.admin_tokens = Some(Secret::from(
            format!("dev-admin:sha256:{}", hash_secret(&creds.admin_token)).as_str(),
        ));
        Auth::from_settings(&settings)?
    };

    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let banner_settings = settings.clone();
    let auth_on = auth.is_enabled();
    let banner = tokio::spawn(async move {
        if let Ok(port) = ready_rx.await {
            print_banner(&banner_settings, port, &creds, auth_on);
        }
    });
    let mock_handle = mock_server.as_ref().map(|s| s.handle());
    if let Some(server) = mock_server {
        tokio::spawn(server);
    }
    let result = run_with(Parts::Both, settings, auth, Some(ready_tx)).await;
    banner.abort();
    if let Some(h) = mock_handle {
        h.stop(true).await;
    }
    result
}

fn print_banner(s: &Settings, port: u16, creds: &DevCredentials, auth: bool) {
    let host = s.http_addr.ip();
    let base = format!("http://{host}:{port}");
    let key = if auth {
        format!(" -H 'X-Api-Key: {}'", creds.api_key)
    } else {
        String::new()
    };
    let admin = if auth {
        format!(" -H 'Authorization: Bearer {}'", creds.admin_token)
    } else {
        String::new()
    };
    println!();
    println!("rtpd dev is running");
    println!("  API              {base}");
    println!("  downstream       {}", s.downstream_url);
    println!("  data             {}", s.data_dir.display());
    if s.kafka_enabled() {
        println!(
            "  Kafka intake     {} topics {} (ids from {}{}), dead letters on {}",
            s.kafka_bootstrap_servers.as_deref().unwrap_or(""),
            s.kafka_topic_list().join(","),
            s.kafka_id_from,
            s.kafka_vendor
                .as_deref()
                .map(|v| format!(", vendor {v}"))
                .unwrap_or_default(),
            s.kafka_dead_letter_topic
        );
    }
    if auth {
        println!(
            "  vendor API key   {}  (vendor {})",
            creds.api_key, creds.vendor
        );
        println!(
            "  HMAC secret      {}  (vendor {})",
            creds.hmac_secret, creds.hmac_vendor
        );
        println!("  admin token      {}", creds.admin_token);
    }
    if s.console {
        println!(
            "  console          {base}/console  (log in with the {})",
            if auth {
                "admin token above"
            } else {
                "any token: RTPD_AUTH=none"
            }
        );
    }
    println!();
    println!("Try:");
    println!(
        "  curl -s -X POST {base}/v1/transactions -H 'Content-Type: application/json'{key} \\\n       -d '{{\"transaction_id\":\"TX-001\",\"amount\":\"10.00\",\"currency\":\"USD\"}}'"
    );
    println!("  curl -s {base}/v1/transactions/TX-001{key}");
    println!("  curl -s {base}/metrics");
    println!("  curl -s '{base}/v1/transactions?state=dead_letter'{admin}");
    if let (Some(servers), Some(topic)) = (
        s.kafka_bootstrap_servers.as_deref(),
        s.kafka_topic_list().first(),
    ) {
        println!(
            "  echo '{{\"transaction_id\":\"TX-K1\",\"amount\":\"10.00\"}}' | kcat -P -b {servers} -t {topic}"
        );
        println!("  rtpd produce --kafka {servers} --topic {topic} --url {base} --count 10000");
    }
    if auth {
        println!();
        println!("Signed with HMAC-SHA256 (see docs/security.md):");
        println!(
            "  body='{{\"transaction_id\":\"TX-002\",\"amount\":\"10.00\"}}'; ts=$(date +%s)\n  \
             sig=$(printf '%s.%s' \"$ts\" \"$body\" | openssl dgst -sha256 -hmac '{}' -r | cut -d' ' -f1)\n  \
             curl -s -X POST {base}/v1/transactions -H 'Content-Type: application/json' \\\n       \
             -H 'X-Rtpd-Vendor: {}' -H \"X-Rtpd-Timestamp: $ts\" -H \"X-Rtpd-Signature: v1=$sig\" -d \"$body\"",
            creds.hmac_secret, creds.hmac_vendor
        );
    }
    println!();
}
