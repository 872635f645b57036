//! The consumer loop (librdkafka): see the module above.

use super::client::{self, IntakeContext, QuietContext};
use super::offsets::{Ticket, Watermarks};
use super::record::{self, Fetched, IdFrom};
use super::{Outcome, headers};
use crate::backoff;
use crate::config::Settings;
use crate::intake::{Dependency, Intake, IntakeError, IntakeOutcome};
use crate::journal::{EntryKind, Journal, JournalEntry};
use crate::transaction::State;
use crate::validate::Invalid;
use anyhow::Context as _;
use bytes::Bytes;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::JoinSet;

/// How often durable offsets are committed.
const COMMIT_EVERY: Duration = Duration::from_millis(500);

/// How long records already in intake may take to finish after a stop.
const GRACE: Duration = Duration::from_secs(20);

struct Shared {
    intake: Intake,
    journal: Journal,
    producer: FutureProducer<QuietContext>,
    dead_letter_topic: String,
    id_from: IdFrom,
    vendor: Option<String>,
    max_bytes: usize,
    marks: Arc<Mutex<Watermarks>>,
    /// Set while a dependency does not answer: the partitions stay paused.
    outage: AtomicBool,
    stop: watch::Receiver<bool>,
}

/// Consumes `RTPD_KAFKA_TOPICS` until `stop`, then lets what is in intake
/// finish (up to [`GRACE`]) and commits what is durable.
pub async fn run(
    intake: Intake,
    journal: Journal,
    settings: &Settings,
    stop: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let topics = settings.kafka_topic_list();
    anyhow::ensure!(!topics.is_empty(), "RTPD_KAFKA_TOPICS is not set");
    let id_from: IdFrom = settings
        .kafka_id_from
        .parse()
        .map_err(|e: String| anyhow::anyhow!("RTPD_KAFKA_ID_FROM: {e}"))?;
    let marks = Arc::new(Mutex::new(Watermarks::new()));
    let entra = if settings.kafka_entra {
        let (credential, identity) =
            crate::azure::identity::credential(settings.azure_client_id.as_deref())
                .map_err(anyhow::Error::msg)?;
        let servers = settings.kafka_bootstrap_servers.as_deref().unwrap_or("");
        tracing::info!(%identity, "Kafka: SASL/OAUTHBEARER with Entra ID tokens");
        Some((
            credential,
            client::entra_scope(servers),
            tokio::runtime::Handle::current(),
        ))
    } else {
        None
    };
    let context = IntakeContext {
        marks: marks.clone(),
        entra,
    };
    let consumer: Arc<StreamConsumer<IntakeContext>> = Arc::new(
        client::consumer_config(settings)?
            .create_with_context(context)
            .context("creating the Kafka consumer")?,
    );
    let topic_refs: Vec<&str> = topics.iter().map(String::as_str).collect();
    consumer
        .subscribe(&topic_refs)
        .context("subscribing to RTPD_KAFKA_TOPICS")?;
    let producer: FutureProducer<QuietContext> = client::producer_config(settings)?
        .create_with_context(QuietContext)
        .context("creating the Kafka dead-letter producer")?;
    tracing::info!(
        topics = ?topics,
        group = %settings.kafka_group_id,
        id_from = %id_from,
        dead_letter_topic = %settings.kafka_dead_letter_topic,
        "Kafka intake started"
    );
    let shared = Arc::new(Shared {
        intake,
        journal,
        producer,
        dead_letter_topic: settings.kafka_dead_letter_topic.clone(),
        id_from,
        vendor: settings.kafka_vendor.clone(),
        max_bytes: settings.max_body_bytes,
        marks: marks.clone(),
        outage: AtomicBool::new(false),
        stop: stop.clone(),
    });
    let max_in_flight = settings.kafka_max_in_flight;
    let mut stop = stop;
    let mut tasks = JoinSet::new();
    let mut tick = tokio::time::interval(COMMIT_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut paused = false;
    loop {
        let full = lock(&marks).in_flight() >= max_in_flight;
        let want_paused = full || shared.outage.load(Ordering::Relaxed);
        if want_paused != paused {
            set_paused(&consumer, want_paused);
            paused = want_paused;
        }
        tokio::select! {
            biased;
            _ = stop.changed() => break,
            Some(joined) = tasks.join_next(), if !tasks.is_empty() => {
                if let Err(e) = joined {
                    tracing::error!(error = %e, "a Kafka record's task panicked; its offset is not committed");
                }
            }
            _ = tick.tick() => {
                commit(&consumer, &marks, CommitMode::Async);
                // A rebalance while paused hands out partitions unpaused.
                if paused {
                    set_paused(&consumer, true);
                }
            }
            received = consumer.recv() => match received {
                Ok(m) => {
                    let fetched = fetched(&m);
                    let ticket = lock(&marks).fetched(&fetched.topic, fetched.partition, fetched.offset);
                    let shared = shared.clone();
                    tasks.spawn(async move { handle(&shared, fetched, ticket).await });
                }
                Err(e) => {
                    // librdkafka reconnects on its own (and its context
                    // reports the cause); the loop keeps polling.
                    tracing::debug!(error = %e, "Kafka consumer error");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
        }
    }
    tracing::info!(
        in_intake = lock(&marks).in_flight(),
        "Kafka intake stopping; committing what is durable"
    );
    let drained =
        tokio::time::timeout(GRACE, async { while tasks.join_next().await.is_some() {} }).await;
    if drained.is_err() {
        tracing::warn!(
            left = tasks.len(),
            "Kafka records still in intake after the grace period: not committed, read again on restart"
        );
        tasks.abort_all();
    }
    // The last commit and the consumer's close (leaving the group) wait
    // for the group coordinator, which may be what is down: bounded, so
    // the process still stops. What is not committed is read again.
    let closing = tokio::task::spawn_blocking(move || {
        commit(&consumer, &marks, CommitMode::Sync);
        drop(consumer);
    });
    if tokio::time::timeout(CLOSE_WITHIN, closing).await.is_err() {
        tracing::warn!(
            "Kafka: the last offset commit or leaving the group did not finish within {CLOSE_WITHIN:?}; the records after the last commit are read again"
        );
    }
    Ok(())
}

/// How long the last commit and leaving the group may take at a stop.
const CLOSE_WITHIN: Duration = Duration::from_secs(5);

fn lock(m: &Mutex<Watermarks>) -> std::sync::MutexGuard<'_, Watermarks> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn set_paused(consumer: &StreamConsumer<IntakeContext>, pause: bool) {
    let assignment = match consumer.assignment() {
        Ok(a) => a,
        Err(e) => {
            tracing::warn!(error = %e, "Kafka: reading the assignment failed");
            return;
        }
    };
    if assignment.count() == 0 {
        return;
    }
    let result = if pause {
        consumer.pause(&assignment)
    } else {
        consumer.resume(&assignment)
    };
    match result {
        Ok(()) => crate::metrics::kafka_paused(pause),
        Err(e) => tracing::warn!(error = %e, pause, "Kafka: pausing or resuming failed"),
    }
}

fn commit(consumer: &StreamConsumer<IntakeContext>, marks: &Mutex<Watermarks>, mode: CommitMode) {
    let offsets = match mode {
        // A last commit sends everything durable, committed before or not.
        CommitMode::Sync => lock(marks).committable(None),
        CommitMode::Async => lock(marks).to_commit(),
    };
    if offsets.is_empty() {
        return;
    }
    let result = client::to_list(&offsets).and_then(|list| consumer.commit(&list, mode));
    if let Err(e) = result {
        tracing::warn!(error = %e, "Kafka offset commit failed; offered again");
        lock(marks).commit_failed(&offsets);
    }
}

fn fetched<M: Message>(m: &M) -> Fetched {
    let headers = m
        .headers()
        .map(|h| {
            h.iter()
                .map(|h| (h.key.to_owned(), h.value.map(<[u8]>::to_vec)))
                .collect()
        })
        .unwrap_or_default();
    Fetched {
        topic: m.topic().to_owned(),
        partition: m.partition(),
        offset: m.offset(),
        key: m.key().map(<[u8]>::to_vec),
        headers,
        payload: m.payload().map(Bytes::copy_from_slice),
    }
}

async fn handle(s: &Shared, r: Fetched, ticket: Ticket) {
    let Some(outcome) = settle(s, &r).await else {
        // Stopped before the record was durable: not committed.
        return;
    };
    crate::metrics::kafka_record(outcome.as_str());
    lock(&s.marks).done(&ticket);
}

/// Takes the record through intake, trying again for as long as a
/// dependency does not answer; `None` if the stop came first.
async fn settle(s: &Shared, r: &Fetched) -> Option<Outcome> {
    let submission = match record::submission(r, &s.id_from, s.vendor.as_deref(), s.max_bytes) {
        Ok(sub) => sub,
        Err(invalid) => return dead_letter(s, r, None, &invalid).await,
    };
    let mut tries = 0u32;
    loop {
        match s.intake.accept(submission.clone()).await {
            Ok(IntakeOutcome::Accepted { record, .. }) => {
                s.outage.store(false, Ordering::Relaxed);
                tracing::debug!(transaction_id = %record.transaction_id, record = %r.name(), "Kafka record accepted");
                return Some(Outcome::Accepted);
            }
            Ok(IntakeOutcome::Duplicate(_)) => {
                s.outage.store(false, Ordering::Relaxed);
                return Some(Outcome::Duplicate);
            }
            Ok(IntakeOutcome::Conflict(existing)) => {
                s.outage.store(false, Ordering::Relaxed);
                let invalid = Invalid::new(
                    "conflict",
                    format!(
                        "transaction {} exists with other content ({}, {})",
                        existing.transaction_id.vendor_id(),
                        existing.sha256,
                        existing.status
                    ),
                );
                let id = submission.transaction_id.to_string();
                return dead_letter(s, r, Some(&id), &invalid).await;
            }
            Err(IntakeError::InvalidId(e)) => {
                let invalid = Invalid::new("invalid_transaction_id", e.to_string());
                return dead_letter(s, r, None, &invalid).await;
            }
            Err(IntakeError::NotUtf8) => {
                let invalid = Invalid::new("invalid_utf8", "body is not valid UTF-8");
                return dead_letter(s, r, None, &invalid).await;
            }
            Err(e) => {
                // A dependency that does not answer, or an error no retry
                // of ours can tell apart from one: never skip the record.
                s.outage.store(true, Ordering::Relaxed);
                let dependency = match &e {
                    IntakeError::Unavailable { dependency, .. } => *dependency,
                    _ => Dependency::Ledger,
                };
                if tries == 0 {
                    tracing::warn!(record = %r.name(), ?dependency, error = %e, "Kafka record waits for intake; partitions paused");
                }
                tries += 1;
                if !pause(s, tries).await {
                    return None;
                }
            }
        }
    }
}

/// Waits before the next try; false if the stop came first.
async fn pause(s: &Shared, tries: u32) -> bool {
    let wait = backoff::exponential(Duration::from_millis(100), Duration::from_secs(5), tries);
    let mut stop = s.stop.clone();
    if *stop.borrow() {
        return false;
    }
    tokio::select! {
        _ = tokio::time::sleep(wait) => true,
        _ = stop.changed() => false,
    }
}

/// Puts the record on the dead-letter topic with the reason in its
/// headers, then journals it; tries again until both are done.
async fn dead_letter(
    s: &Shared,
    r: &Fetched,
    transaction_id: Option<&str>,
    why: &Invalid,
) -> Option<Outcome> {
    tracing::warn!(record = %r.name(), reason = why.code, error = %why.message, dead_letter_topic = %s.dead_letter_topic, "Kafka record refused; set aside on the dead-letter topic");
    let partition = r.partition.to_string();
    let offset = r.offset.to_string();
    let mut tries = 0u32;
    loop {
        let mut headers = OwnedHeaders::new_with_capacity(r.headers.len() + 6);
        for (k, v) in &r.headers {
            headers = headers.insert(Header {
                key: k,
                value: v.as_deref(),
            });
        }
        for (k, v) in [
            (headers::REASON, why.code),
            (headers::ERROR, why.message.as_str()),
            (headers::TOPIC, r.topic.as_str()),
            (headers::PARTITION, partition.as_str()),
            (headers::OFFSET, offset.as_str()),
        ] {
            headers = headers.insert(Header {
                key: k,
                value: Some(v),
            });
        }
        if let Some(id) = transaction_id {
            headers = headers.insert(Header {
                key: headers::TRANSACTION_ID,
                value: Some(id),
            });
        }
        let mut out: FutureRecord<'_, [u8], [u8]> =
            FutureRecord::to(&s.dead_letter_topic).headers(headers);
        if let Some(k) = &r.key {
            out = out.key(k.as_slice());
        }
        if let Some(p) = &r.payload {
            out = out.payload(p.as_ref());
        }
        match s.producer.send(out, Duration::from_secs(30)).await {
            Ok(_) => break,
            Err((e, _)) => {
                if tries == 0 {
                    tracing::error!(record = %r.name(), error = %e, "dead-letter topic unavailable; the record waits (partitions paused)");
                }
                s.outage.store(true, Ordering::Relaxed);
                tries += 1;
                if !pause(s, tries).await {
                    return None;
                }
            }
        }
    }
    let entry = JournalEntry {
        v: 1,
        kind: EntryKind::Rejected,
        transaction_id: format!("kafka:{}", r.name()),
        at: crate::clock::now(),
        attempt: None,
        state: State::DeadLetter,
        error: Some(why.message.clone()),
        next_retry_at: None,
        actor: "kafka-intake".into(),
        reason: Some(match transaction_id {
            Some(id) => format!("{} ({id}); sent to {}", why.code, s.dead_letter_topic),
            None => format!("{}; sent to {}", why.code, s.dead_letter_topic),
        }),
        sha256: r
            .payload
            .as_ref()
            .map(|p| crate::transaction::Sha256::of(p)),
        wal_ref: None,
        replay_nonce: None,
    };
    let mut tries = 0u32;
    loop {
        match s.journal.append(&entry).await {
            Ok(_) => break,
            Err(e) => {
                if tries == 0 {
                    tracing::error!(record = %r.name(), error = %e, "journaling a dead-lettered Kafka record failed; trying again");
                }
                s.outage.store(true, Ordering::Relaxed);
                tries += 1;
                if !pause(s, tries).await {
                    return None;
                }
            }
        }
    }
    s.outage.store(false, Ordering::Relaxed);
    Some(Outcome::DeadLettered)
}
