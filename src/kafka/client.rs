//! The librdkafka side: properties from the settings, and the client
//! context that commits before a rebalance takes partitions away, offers a
//! failed commit again, logs librdkafka's lines quietly, and hands out
//! Entra ID tokens for Event Hubs' Kafka endpoint.

use super::offsets::{Partition, Watermarks};
use crate::config::Settings;
use anyhow::Context as _;
use azure_core::credentials::TokenCredential;
use rdkafka::ClientContext;
use rdkafka::client::OAuthToken;
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::KafkaError;
use rdkafka::error::KafkaResult;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use std::sync::{Arc, Mutex};

/// What the settings say about librdkafka: the bootstrap servers, the group,
/// the fixed properties the intake's guarantees rest on, and every
/// `RTPD_KAFKA_CONFIG_*` variable passed through.
pub fn consumer_config(settings: &Settings) -> anyhow::Result<ClientConfig> {
    let mut c = common(settings)?;
    c.set("group.id", &settings.kafka_group_id)
        // Offsets are committed by the intake, for durable records only.
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        // A new group starts at the oldest record: nothing is skipped.
        .set("auto.offset.reset", "earliest");
    passthrough(&mut c, settings)?;
    Ok(c)
}

/// The dead-letter topic's producer: every record acknowledged by all
/// in-sync replicas, no duplicates from the producer's own retries.
pub fn producer_config(settings: &Settings) -> anyhow::Result<ClientConfig> {
    let mut c = common(settings)?;
    // Room for the largest record a topic may hold (a refused oversized
    // record goes to the dead-letter topic as it was read); past what the
    // broker takes, it goes without its value.
    let max = (settings.max_body_bytes.saturating_mul(4) + 65_536).clamp(1_000_000, 100_000_000);
    c.set("message.timeout.ms", "30000")
        .set("message.max.bytes", max.to_string());
    passthrough(&mut c, settings)?;
    // After the pass-through: what makes a dead letter durable is not
    // anyone's to change (the settings check refuses other values too).
    c.set("enable.idempotence", "true").set("acks", "all");
    // Consumer-only properties passed through would make the producer warn.
    for k in [
        "group.id",
        "auto.offset.reset",
        "enable.auto.commit",
        "enable.auto.offset.store",
    ] {
        c.remove(k);
    }
    Ok(c)
}

fn common(settings: &Settings) -> anyhow::Result<ClientConfig> {
    let servers = settings
        .kafka_bootstrap_servers
        .as_deref()
        .context("RTPD_KAFKA_BOOTSTRAP_SERVERS is not set")?;
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", servers)
        .set("client.id", "rtpd")
        .set_log_level(RDKafkaLogLevel::Warning);
    if settings.kafka_entra {
        // Event Hubs' Kafka endpoint: SASL over TLS with an Entra ID token.
        c.set("security.protocol", "SASL_SSL")
            .set("sasl.mechanism", "OAUTHBEARER");
    }
    Ok(c)
}

fn passthrough(c: &mut ClientConfig, settings: &Settings) -> anyhow::Result<()> {
    for (k, v) in &settings.kafka_config.0 {
        c.set(k, v.expose());
    }
    Ok(())
}

/// The Entra ID scope of an Event Hubs namespace, from the first bootstrap
/// server (`<namespace>.servicebus.windows.net:9093`).
pub fn entra_scope(servers: &str) -> String {
    let first = servers.split(',').next().unwrap_or("").trim();
    let host = first.rsplit_once(':').map_or(first, |(h, _)| h);
    format!("https://{host}/.default")
}

/// librdkafka's own log lines and errors, at most one a kind every
/// [`QUIET_FOR`]: a broker that is down is reported every few milliseconds
/// by each client otherwise.
pub const QUIET_FOR: std::time::Duration = std::time::Duration::from_secs(30);

pub(super) fn quietly(kind: &str, emit: impl FnOnce(u64)) {
    use std::collections::HashMap;
    use std::time::Instant;
    static SEEN: Mutex<Option<HashMap<String, (Instant, u64)>>> = Mutex::new(None);
    let mut seen = SEEN.lock().unwrap_or_else(|p| p.into_inner());
    let seen = seen.get_or_insert_with(HashMap::new);
    let now = Instant::now();
    match seen.get_mut(kind) {
        Some((at, suppressed)) if now.duration_since(*at) < QUIET_FOR => *suppressed += 1,
        Some((at, suppressed)) => {
            let n = *suppressed;
            (*at, *suppressed) = (now, 0);
            emit(n);
        }
        None => {
            seen.insert(kind.to_owned(), (now, 0));
            emit(0);
        }
    }
}

fn log_line(level: RDKafkaLogLevel, fac: &str, message: &str) {
    quietly(&format!("log:{fac}"), |suppressed| match level {
        RDKafkaLogLevel::Emerg
        | RDKafkaLogLevel::Alert
        | RDKafkaLogLevel::Critical
        | RDKafkaLogLevel::Error
        | RDKafkaLogLevel::Warning => {
            tracing::warn!(target: "librdkafka", facility = fac, suppressed, "{message}")
        }
        _ => tracing::debug!(target: "librdkafka", facility = fac, suppressed, "{message}"),
    });
}

fn client_error(error: KafkaError, reason: &str) {
    let kind = match error.rdkafka_error_code() {
        Some(code) => format!("error:{code:?}"),
        None => format!("error:{error}"),
    };
    quietly(
        &kind,
        |suppressed| tracing::warn!(target: "librdkafka", error = %error, suppressed, "Kafka client: {reason}"),
    );
}

/// An Entra ID token source for SASL/OAUTHBEARER: the credential, the
/// scope, and the runtime its calls run on.
pub type Entra = (Arc<dyn TokenCredential>, String, tokio::runtime::Handle);

/// Both clients' context (the consumer's has the watermarks): librdkafka's
/// lines quietly, Entra ID tokens, and for the consumer the rebalance and
/// commit callbacks.
pub struct IntakeContext {
    pub marks: Option<Arc<Mutex<Watermarks>>>,
    pub entra: Option<Entra>,
}

impl ClientContext for IntakeContext {
    const ENABLE_REFRESH_OAUTH_TOKEN: bool = true;

    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        log_line(level, fac, log_message)
    }

    fn error(&self, error: KafkaError, reason: &str) {
        client_error(error, reason)
    }

    fn generate_oauth_token(
        &self,
        _oauthbearer_config: Option<&str>,
    ) -> Result<OAuthToken, Box<dyn std::error::Error>> {
        let Some((credential, scope, runtime)) = &self.entra else {
            return Err("RTPD_KAFKA_ENTRA is off: set sasl.* through RTPD_KAFKA_CONFIG_*".into());
        };
        // Called while a client polls: for the consumer that is inside the
        // intake's task, a runtime worker, which must be told it blocks.
        // (The credential caches tokens; this is a network call about once
        // an hour.)
        let fetch = || runtime.block_on(credential.get_token(&[scope.as_str()], None));
        let token = if tokio::runtime::Handle::try_current().is_ok() {
            tokio::task::block_in_place(fetch)
        } else {
            fetch()
        }?;
        Ok(OAuthToken {
            token: token.token.secret().to_owned(),
            principal_name: String::new(),
            lifetime_ms: token.expires_on.unix_timestamp() * 1000,
        })
    }
}

impl ConsumerContext for IntakeContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let Rebalance::Revoke(tpl) = rebalance else {
            return;
        };
        let Some(marks) = &self.marks else {
            return;
        };
        let revoked: Vec<Partition> = tpl
            .elements()
            .iter()
            .map(|e| (e.topic().to_owned(), e.partition()))
            .collect();
        let mut m = marks.lock().unwrap_or_else(|p| p.into_inner());
        // What is durable goes in before another member takes over; what
        // is still in intake is read again there (the ledger absorbs it).
        // Asynchronously: this runs inside the consumer's poll, and a sync
        // commit waits out a coordinator that is gone (a lost assignment)
        // for the whole session timeout. If it lands late, the new owner
        // reads a little more again.
        let offsets = m.committable(Some(&revoked));
        m.revoke(&revoked);
        drop(m);
        crate::metrics::kafka_partitions_revoked(&revoked);
        tracing::info!(partitions = revoked.len(), "Kafka partitions revoked");
        if offsets.is_empty() {
            return;
        }
        if let Err(e) = to_list(&offsets).and_then(|list| consumer.commit(&list, CommitMode::Async))
        {
            tracing::warn!(error = %e, "commit before a rebalance failed; the new owner reads those records again");
        }
    }

    fn commit_callback(&self, result: KafkaResult<()>, offsets: &TopicPartitionList) {
        let (Err(e), Some(marks)) = (result, &self.marks) else {
            return;
        };
        let failed: Vec<(Partition, i64)> = offsets
            .elements()
            .iter()
            .filter_map(|el| match el.offset() {
                Offset::Offset(o) => Some(((el.topic().to_owned(), el.partition()), o)),
                _ => None,
            })
            .collect();
        quietly(
            "commit",
            |suppressed| tracing::warn!(error = %e, suppressed, "Kafka offset commit failed; offered again"),
        );
        marks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .commit_failed(&failed);
    }

    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            tracing::info!(partitions = tpl.count(), "Kafka partitions assigned");
        }
    }
}

/// A commit request for these offsets (each the next offset to read).
pub fn to_list(offsets: &[(Partition, i64)]) -> KafkaResult<TopicPartitionList> {
    let mut list = TopicPartitionList::new();
    for ((topic, partition), next) in offsets {
        list.add_partition_offset(topic, *partition, Offset::Offset(*next))?;
    }
    Ok(list)
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_entra_scope_is_the_namespace_host() {
        assert_eq!(
            super::entra_scope("ns1.servicebus.windows.net:9093"),
            "https://ns1.servicebus.windows.net/.default"
        );
        assert_eq!(
            super::entra_scope(" a.servicebus.windows.net:9093,b:9093"),
            "https://a.servicebus.windows.net/.default"
        );
    }
}
