//! The consumer loop (librdkafka): see the module above.

use super::client::{self, Entra, IntakeContext};
use super::offsets::{Partition, Ticket, Watermarks};
use super::record::{self, Fetched, IdFrom};
use super::{Outcome, headers};
use crate::backoff;
use crate::config::Settings;
use crate::intake::{Dependency, Intake, IntakeError, IntakeOutcome, Submission};
use crate::journal::{EntryKind, Journal, JournalEntry};
use crate::transaction::{Sha256, State, TransactionId};
use crate::validate::Invalid;
use anyhow::Context as _;
use bytes::Bytes;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinSet;

/// How often durable offsets are committed.
const COMMIT_EVERY: Duration = Duration::from_millis(500);

/// How long records already in intake may take to finish after a stop.
const GRACE: Duration = Duration::from_secs(20);

/// How long the last commit and leaving the group may take at a stop.
const CLOSE_WITHIN: Duration = Duration::from_secs(5);

/// How often the consumer lag is read (the partitions' high watermarks).
const LAG_EVERY: Duration = Duration::from_secs(5);

type IntakeConsumer = StreamConsumer<IntakeContext>;

struct Shared {
    intake: Intake,
    journal: Journal,
    producer: FutureProducer<IntakeContext>,
    dead_letter_topic: String,
    marks: Arc<Mutex<Watermarks>>,
    /// Records waiting for intake's dependencies (WAL, ledger, journal):
    /// while any does, every partition waits.
    waiting: AtomicUsize,
    /// Per partition, its records the dead-letter topic does not take yet:
    /// only those partitions wait (they cannot go past such a record).
    blocked: Mutex<HashMap<Partition, usize>>,
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
    let entra = entra(settings)?;
    let consumer: Arc<IntakeConsumer> = Arc::new(
        client::consumer_config(settings)?
            .create_with_context(IntakeContext {
                marks: Some(marks.clone()),
                entra: entra.clone(),
            })
            .context("creating the Kafka consumer")?,
    );
    let producer: FutureProducer<IntakeContext> = client::producer_config(settings)?
        .create_with_context(IntakeContext { marks: None, entra })
        .context("creating the Kafka dead-letter producer")?;
    check_dead_letter_topic(&producer, &settings.kafka_dead_letter_topic).await?;
    let topic_refs: Vec<&str> = topics.iter().map(String::as_str).collect();
    consumer
        .subscribe(&topic_refs)
        .context("subscribing to RTPD_KAFKA_TOPICS")?;
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
        marks: marks.clone(),
        waiting: AtomicUsize::new(0),
        blocked: Mutex::new(HashMap::new()),
        stop: stop.clone(),
    });
    watch_lag(Arc::downgrade(&consumer), marks.clone(), stop.clone());
    let max_in_flight = settings.kafka_max_in_flight;
    let vendor = settings.kafka_vendor.clone();
    let max_bytes = settings.max_body_bytes;
    let mut stop = stop;
    let mut tasks = JoinSet::new();
    // The last task of each transaction id, so that records of one id are
    // taken in the order they were read (the first of two different
    // payloads under one id is the one that stands, as in the partition).
    let mut chains: HashMap<String, oneshot::Receiver<()>> = HashMap::new();
    let mut tick = tokio::time::interval(COMMIT_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut paused = Paused::default();
    loop {
        // Every task counts, also one whose partition was revoked meanwhile.
        let all = tasks.len() >= max_in_flight || shared.waiting.load(Ordering::Relaxed) > 0;
        let blocked: HashSet<Partition> = lock(&shared.blocked).keys().cloned().collect();
        if paused.differs(all, &blocked) {
            paused.apply(&consumer, all, blocked);
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
                // A rebalance hands out partitions unpaused.
                let (all, blocked) = (paused.all, paused.blocked.clone());
                paused.apply(&consumer, all, blocked);
                chains.retain(|_, rx| matches!(rx.try_recv(), Err(oneshot::error::TryRecvError::Empty)));
            }
            received = consumer.recv() => match received {
                Ok(m) => {
                    let fetched = fetched(&m);
                    let ticket = lock(&marks).fetched(&fetched.topic, fetched.partition, fetched.offset);
                    let prepared = record::submission(&fetched, &id_from, vendor.as_deref(), max_bytes);
                    let (done, after) = match &prepared {
                        Ok(sub) => {
                            let key = TransactionId::scoped(sub.source.vendor.as_deref(), &sub.transaction_id)
                                .map(|k| k.to_string())
                                .unwrap_or_else(|_| sub.transaction_id.to_string());
                            let (tx, rx) = oneshot::channel();
                            (Some(tx), chains.insert(key, rx))
                        }
                        Err(_) => (None, None),
                    };
                    let shared = shared.clone();
                    tasks.spawn(async move {
                        if let Some(before) = after {
                            // Sent or dropped: either way that record is through.
                            let _ = before.await;
                        }
                        handle(&shared, fetched, prepared, ticket).await;
                        drop(done);
                    });
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
        in_intake = tasks.len(),
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
    // for the group coordinator, which may be what is down. On a thread of
    // their own, not the runtime's blocking pool (the runtime waits for
    // that at exit): the process stops after CLOSE_WITHIN whatever they do,
    // and what was not committed is read again.
    let (closed_tx, closed_rx) = oneshot::channel();
    std::thread::spawn(move || {
        commit(&consumer, &marks, CommitMode::Sync);
        drop(consumer);
        let _ = closed_tx.send(());
    });
    if tokio::time::timeout(CLOSE_WITHIN, closed_rx).await.is_err() {
        tracing::warn!(
            "Kafka: the last offset commit or leaving the group did not finish within {CLOSE_WITHIN:?}; the records after the last commit are read again"
        );
    }
    Ok(())
}

fn entra(settings: &Settings) -> anyhow::Result<Option<Entra>> {
    if !settings.kafka_entra {
        return Ok(None);
    }
    let (credential, identity) =
        crate::azure::identity::credential(settings.azure_client_id.as_deref())
            .map_err(anyhow::Error::msg)?;
    let servers = settings.kafka_bootstrap_servers.as_deref().unwrap_or("");
    tracing::info!(%identity, "Kafka: SASL/OAUTHBEARER with Entra ID tokens");
    Ok(Some((
        credential,
        client::entra_scope(servers),
        tokio::runtime::Handle::current(),
    )))
}

/// Refuses to start when the brokers say the dead-letter topic does not
/// exist (a bad record would otherwise stop its partition until someone
/// creates it); brokers that do not answer yet are not a reason not to start.
async fn check_dead_letter_topic(
    producer: &FutureProducer<IntakeContext>,
    topic: &str,
) -> anyhow::Result<()> {
    use rdkafka::producer::Producer;
    let (tx, rx) = oneshot::channel();
    // A blocking call: on a thread of its own, bounded.
    let metadata = {
        let p = producer.clone();
        let t = topic.to_owned();
        std::thread::spawn(move || {
            let _ = tx.send(p.client().fetch_metadata(Some(&t), Duration::from_secs(10)));
        });
        tokio::time::timeout(Duration::from_secs(12), rx).await
    };
    match metadata {
        Ok(Ok(Ok(m))) => {
            let missing = m.topics().iter().any(|t| {
                t.name() == topic
                    && t.error().is_some_and(|e| {
                        RDKafkaErrorCode::from(e) == RDKafkaErrorCode::UnknownTopicOrPartition
                    })
            });
            anyhow::ensure!(
                !missing,
                "invalid configuration: RTPD_KAFKA_DEAD_LETTER_TOPIC: the brokers have no topic {topic:?} (create it, or let them create topics)"
            );
        }
        Ok(Ok(Err(e))) => {
            tracing::warn!(error = %e, topic, "Kafka: could not check the dead-letter topic; going on")
        }
        _ => tracing::warn!(
            topic,
            "Kafka: no answer about the dead-letter topic; going on"
        ),
    }
    Ok(())
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Which partitions are paused.
#[derive(Default)]
struct Paused {
    /// All of them (an outage, or too many records in intake).
    all: bool,
    /// Those the dead-letter topic holds up.
    blocked: HashSet<Partition>,
    /// What was paused last time.
    now: HashSet<Partition>,
}

impl Paused {
    fn differs(&self, all: bool, blocked: &HashSet<Partition>) -> bool {
        self.all != all || self.blocked != *blocked
    }

    fn apply(&mut self, consumer: &IntakeConsumer, all: bool, blocked: HashSet<Partition>) {
        self.all = all;
        self.blocked = blocked;
        let assigned: Vec<Partition> = match consumer.assignment() {
            Ok(a) => a
                .elements()
                .iter()
                .map(|e| (e.topic().to_owned(), e.partition()))
                .collect(),
            Err(e) => {
                tracing::warn!(error = %e, "Kafka: reading the assignment failed");
                return;
            }
        };
        let want: HashSet<Partition> = assigned
            .iter()
            .filter(|p| self.all || self.blocked.contains(*p))
            .cloned()
            .collect();
        // Paused again each time: a rebalance resumes what it hands out.
        let pause: Vec<&Partition> = want.iter().collect();
        let resume: Vec<&Partition> = assigned.iter().filter(|p| !want.contains(*p)).collect();
        for (list, pausing) in [(pause, true), (resume, false)] {
            if list.is_empty() {
                continue;
            }
            let mut tpl = TopicPartitionList::new();
            for (t, p) in list {
                tpl.add_partition(t, *p);
            }
            let result = if pausing {
                consumer.pause(&tpl)
            } else {
                consumer.resume(&tpl)
            };
            if let Err(e) = result {
                tracing::warn!(error = %e, pausing, "Kafka: pausing or resuming failed");
            }
        }
        if want.is_empty() != self.now.is_empty() {
            tracing::info!(
                paused = want.len(),
                "Kafka partitions {}",
                if want.is_empty() { "resumed" } else { "paused" }
            );
        }
        crate::metrics::kafka_paused(!want.is_empty());
        self.now = want;
    }
}

fn commit(consumer: &IntakeConsumer, marks: &Mutex<Watermarks>, mode: CommitMode) {
    let offsets = match mode {
        // A last commit sends everything durable, committed before or not.
        CommitMode::Sync => lock(marks).committable(None),
        CommitMode::Async => lock(marks).to_commit(),
    };
    if offsets.is_empty() {
        return;
    }
    // An async commit's failure comes back in the context's commit callback.
    let result = client::to_list(&offsets).and_then(|list| consumer.commit(&list, mode));
    if let Err(e) = result {
        tracing::warn!(error = %e, "Kafka offset commit failed; offered again");
        lock(marks).commit_failed(&offsets);
    }
}

/// Every [`LAG_EVERY`], each assigned partition's records behind its end:
/// the high watermark less what is durable (the committable offset, or
/// before any record of it is, the first record fetched, else the group's
/// committed offset, the position, or the low watermark). A partition whose
/// watermarks do not come back keeps its last value. Read from the brokers, so it moves while the
/// partitions are paused. On a thread of its own (the calls block, up to
/// 2 s a partition), holding the consumer only while it reads, and ending
/// at the stop: it never holds up the process's exit.
fn watch_lag(
    consumer: std::sync::Weak<IntakeConsumer>,
    marks: Arc<Mutex<Watermarks>>,
    stop: watch::Receiver<bool>,
) {
    let stopped = move || *stop.borrow();
    std::thread::spawn(move || {
        while !stopped() {
            std::thread::sleep(LAG_EVERY);
            let Some(c) = consumer.upgrade() else { return };
            if stopped() {
                return;
            }
            let Ok(assigned) = c.assignment() else {
                continue;
            };
            let offsets =
                |tpl: rdkafka::error::KafkaResult<TopicPartitionList>| -> HashMap<Partition, i64> {
                    tpl.map(|tpl| {
                        tpl.elements()
                            .iter()
                            .filter_map(|e| match e.offset() {
                                Offset::Offset(o) => {
                                    Some(((e.topic().to_owned(), e.partition()), o))
                                }
                                _ => None,
                            })
                            .collect()
                    })
                    .unwrap_or_default()
                };
            let positions = offsets(c.position());
            let committed = offsets(c.committed(Duration::from_secs(2)));
            let durable: HashMap<Partition, i64> =
                lock(&marks).not_durable_from().into_iter().collect();
            let assigned_now: Vec<Partition> = assigned
                .elements()
                .iter()
                .map(|e| (e.topic().to_owned(), e.partition()))
                .collect();
            let mut lags = Vec::new();
            for e in assigned.elements() {
                if stopped() {
                    return;
                }
                let p = (e.topic().to_owned(), e.partition());
                let Ok((low, high)) = c.fetch_watermarks(&p.0, p.1, Duration::from_secs(2)) else {
                    continue;
                };
                let from = durable
                    .get(&p)
                    .or(committed.get(&p))
                    .or(positions.get(&p))
                    .copied()
                    .unwrap_or(low);
                lags.push((p, (high - from).max(0)));
            }
            drop(c);
            crate::metrics::kafka_consumer_lags(&lags, &assigned_now);
        }
    });
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

async fn handle(s: &Shared, r: Fetched, prepared: Result<Submission, Invalid>, ticket: Ticket) {
    let Some(outcome) = settle(s, &r, prepared).await else {
        // Stopped before the record was durable: not committed.
        return;
    };
    crate::metrics::kafka_record(outcome.as_str());
    lock(&s.marks).done(&ticket);
}

/// Counts a record as waiting for as long as it lives (also when its task
/// is aborted at a stop).
struct Waiting<'a>(&'a AtomicUsize);

impl<'a> Waiting<'a> {
    fn new(n: &'a AtomicUsize) -> Waiting<'a> {
        n.fetch_add(1, Ordering::Relaxed);
        Waiting(n)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Counts a record of `partition` as held up by the dead-letter topic.
struct Blocked<'a>(&'a Mutex<HashMap<Partition, usize>>, Partition);

impl<'a> Blocked<'a> {
    fn new(m: &'a Mutex<HashMap<Partition, usize>>, p: Partition) -> Blocked<'a> {
        *lock(m).entry(p.clone()).or_default() += 1;
        Blocked(m, p)
    }
}

impl Drop for Blocked<'_> {
    fn drop(&mut self) {
        let mut m = lock(self.0);
        if let Some(n) = m.get_mut(&self.1) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.1);
            }
        }
    }
}

/// Takes the record through intake, trying again for as long as a
/// dependency does not answer; `None` if the stop came first.
async fn settle(s: &Shared, r: &Fetched, prepared: Result<Submission, Invalid>) -> Option<Outcome> {
    let submission = match prepared {
        Ok(sub) => sub,
        Err(invalid) => return dead_letter(s, r, None, &invalid).await,
    };
    let mut tries = 0u32;
    let mut waiting = None;
    loop {
        match s.intake.accept(submission.clone()).await {
            Ok(IntakeOutcome::Accepted { record, .. }) => {
                tracing::debug!(transaction_id = %record.transaction_id, record = %r.name(), "Kafka record accepted");
                return Some(Outcome::Accepted);
            }
            Ok(IntakeOutcome::Duplicate(_)) => {
                return Some(Outcome::Duplicate);
            }
            Ok(IntakeOutcome::Conflict(existing)) => {
                drop(waiting.take());
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
                drop(waiting.take());
                let invalid = Invalid::new("invalid_transaction_id", e.to_string());
                return dead_letter(s, r, None, &invalid).await;
            }
            Err(IntakeError::NotUtf8) => {
                drop(waiting.take());
                let invalid = Invalid::new("invalid_utf8", "body is not valid UTF-8");
                return dead_letter(s, r, None, &invalid).await;
            }
            Err(e) => {
                // A dependency that does not answer, or an error no retry
                // of ours can tell apart from one: never skip the record.
                waiting.get_or_insert_with(|| Waiting::new(&s.waiting));
                let dependency = match &e {
                    IntakeError::Unavailable { dependency, .. } => *dependency,
                    _ => Dependency::Ledger,
                };
                if tries == 0 {
                    tracing::warn!(record = %r.name(), ?dependency, error = %e, "Kafka record waits for intake; partitions paused");
                }
                tries += 1;
                if !wait_to_retry(s, tries).await {
                    return None;
                }
            }
        }
    }
}

/// Waits before the next try; false if the stop came first.
async fn wait_to_retry(s: &Shared, tries: u32) -> bool {
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

/// A produce error that no retry of the same record can get past.
fn refused_for_good(e: &KafkaError) -> bool {
    matches!(
        e.rdkafka_error_code(),
        Some(
            RDKafkaErrorCode::MessageSizeTooLarge
                | RDKafkaErrorCode::InvalidMessageSize
                | RDKafkaErrorCode::InvalidMessage
                | RDKafkaErrorCode::InvalidRecord
                | RDKafkaErrorCode::MessageBatchTooLarge
        )
    )
}

/// Puts the record on the dead-letter topic with the reason in its
/// headers, then journals it; tries again until both are done. A record
/// the topic refuses for good (too large for it) goes without its value,
/// its size and sha256 in the headers.
async fn dead_letter(
    s: &Shared,
    r: &Fetched,
    transaction_id: Option<&str>,
    why: &Invalid,
) -> Option<Outcome> {
    tracing::warn!(record = %r.name(), reason = why.code, error = %why.message, dead_letter_topic = %s.dead_letter_topic, "Kafka record refused; set aside on the dead-letter topic");
    let partition_key = (r.topic.clone(), r.partition);
    let partition = r.partition.to_string();
    let offset = r.offset.to_string();
    let sha256 = r.payload.as_ref().map(|p| Sha256::of(p));
    let size = r.payload.as_ref().map_or(0, |p| p.len()).to_string();
    // 0: as read; 1: without its value; 2: without its key and its own
    // headers too (a record the topic refuses for good at each step).
    let mut stripped = 0u8;
    let mut tries = 0u32;
    let mut blocked = None;
    loop {
        let mut hs = OwnedHeaders::new_with_capacity(r.headers.len() + 8);
        for (k, v) in r.headers.iter().filter(|_| stripped < 2) {
            hs = hs.insert(Header {
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
            hs = hs.insert(Header {
                key: k,
                value: Some(v),
            });
        }
        if let Some(id) = transaction_id {
            hs = hs.insert(Header {
                key: headers::TRANSACTION_ID,
                value: Some(id),
            });
        }
        if stripped > 0 {
            hs = hs.insert(Header {
                key: headers::VALUE_DROPPED,
                value: Some(&format!(
                    "{size} bytes, sha256 {}",
                    sha256.as_ref().map_or("-", |s| s.as_str())
                )),
            });
        }
        let mut out: FutureRecord<'_, [u8], [u8]> =
            FutureRecord::to(&s.dead_letter_topic).headers(hs);
        if let (Some(k), 0 | 1) = (&r.key, stripped) {
            out = out.key(k.as_slice());
        }
        if let (Some(p), 0) = (&r.payload, stripped) {
            out = out.payload(p.as_ref());
        }
        let mut stop = s.stop.clone();
        let sent = tokio::select! {
            sent = s.producer.send(out, Duration::from_secs(30)) => sent,
            _ = stop.changed() => return None,
        };
        match sent {
            Ok(_) => break,
            Err((e, _)) if refused_for_good(&e) && stripped < 2 => {
                stripped += 1;
                tracing::warn!(record = %r.name(), error = %e, dead_letter_topic = %s.dead_letter_topic, "the dead-letter topic refuses the record as it is; set aside without its {}", if stripped == 1 { "value" } else { "value, key and headers" });
            }
            Err((e, _)) => {
                // Only this record's partition waits: it cannot go past it.
                blocked.get_or_insert_with(|| Blocked::new(&s.blocked, partition_key.clone()));
                super::client::quietly(
                    "dead-letter",
                    |suppressed| tracing::error!(record = %r.name(), error = %e, dead_letter_topic = %s.dead_letter_topic, suppressed, "the dead-letter topic does not take a refused record; its partition waits (paused)"),
                );
                tries += 1;
                if !wait_to_retry(s, tries).await {
                    return None;
                }
            }
        }
    }
    drop(blocked);
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
        sha256,
        wal_ref: None,
        replay_nonce: None,
        latency_ms: None,
    };
    let mut tries = 0u32;
    let mut waiting = None;
    loop {
        match s.journal.append(&entry).await {
            Ok(_) => break,
            Err(e) => {
                if tries == 0 {
                    tracing::error!(record = %r.name(), error = %e, "journaling a dead-lettered Kafka record failed; trying again");
                }
                waiting.get_or_insert_with(|| Waiting::new(&s.waiting));
                tries += 1;
                if !wait_to_retry(s, tries).await {
                    return None;
                }
            }
        }
    }
    drop(waiting);
    Some(Outcome::DeadLettered)
}
