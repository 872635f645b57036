//! The operations console's reads and actions, over the ports: what the
//! overview counts, one payment's timeline (WAL record, outcome journal,
//! ledger, dead-letter queue), payments found by id or by vendor and time,
//! dead letters grouped by reason, the WAL by hour, and replays — planned
//! (the dry-run count) and carried out through [`Replayer`], the code `rtpd
//! replay`, `rtpd dlq replay` and the replay routes use. The HTTP side (the
//! login, sessions, CSRF and the pages) is `api::console`.

pub mod redact;

use crate::envelope::transaction_id_of;
use crate::journal::{JournalEntry, JournalIndex};
use crate::ledger::{Counts, LedgerError};
use crate::queue::{QueueError, ReceivedMessage};
use crate::reconcile::{LastPass, LastPassCell};
use crate::replay::{ReplayError, ReplayRequest, Replayed, Replayer, load_record};
use crate::transaction::{InvalidId, Sha256, State, TransactionId, TxRecord, WalRef, machine};
use crate::wal::{WalError, WalRecord};
use chrono::{DateTime, Duration as ChronoDuration, Utc};
use redact::{Redaction, Shown};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::{Arc, Mutex};

/// Dead-lettered messages read for a view or a plan, at most: a queue
/// holding more shows that many and says so.
pub const DEAD_LETTERS_READ: usize = 2000;

/// Transactions one replay action (a group, a time range) takes at most.
pub const MAX_BULK: usize = 500;

/// Replays per second of a bulk action, as `rtpd dlq replay`'s default.
pub const BULK_RATE_PER_SEC: u32 = 50;

/// WAL records a search by vendor and time reads at most.
pub const FIND_MAX_RECORDS: usize = 100_000;

/// Payments a search by vendor and time lists at most.
pub const FIND_MAX_SHOWN: usize = 200;

/// How much of the outcome journal a timeline reads: this long after a
/// payment's receipt, and this long before its last change. A retry budget
/// at the seed's backoff (60 s doubling, 5 retries) spends about half an
/// hour, so both ends of a history fit; a replay days later in between is
/// shown when it was the last change. Reading every hour from receipt to
/// now would read the whole journal of those days for one page.
pub const TIMELINE_JOURNAL_SPAN: ChronoDuration = ChronoDuration::hours(2);

/// Segments of one WAL hour read for their record counts at most (those
/// whose metadata does not give it).
pub const WAL_SEGMENTS_READ: usize = 100;

#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    #[error(transparent)]
    Wal(#[from] WalError),
    #[error(transparent)]
    Queue(#[from] QueueError),
    #[error(transparent)]
    Replay(#[from] ReplayError),
    #[error("{0}")]
    Invalid(String),
}

impl From<InvalidId> for ConsoleError {
    fn from(e: InvalidId) -> Self {
        ConsoleError::Invalid(e.to_string())
    }
}

/// What the console reads and does, with the ports of a replay.
#[derive(Clone)]
pub struct Console {
    pub replayer: Replayer,
    pub redaction: Redaction,
    pub observed: Observed,
    /// The last overview read, and when (one read at a time).
    last_overview: Arc<tokio::sync::Mutex<Option<(tokio::time::Instant, Overview)>>>,
}

/// How long one overview read answers every open overview.
pub const OVERVIEW_REUSED_FOR: std::time::Duration = std::time::Duration::from_secs(2);

/// What this process observes over time for the overview: the ledger's
/// counts each overview read (for the rates while the console is open; no
/// task polls the ledger for a console nobody looks at), and the
/// reconciler's last pass, when the reconciler runs in this process.
#[derive(Clone, Default)]
pub struct Observed {
    pub reconciler: LastPassCell,
    samples: Arc<Mutex<Samples>>,
}

/// The ledger's counts, when read, oldest first.
type Samples = VecDeque<(DateTime<Utc>, Counts)>;

/// Transactions received and finished over a window (ledger counts).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rates {
    pub window: ChronoDuration,
    /// New ledger entries: transactions received.
    pub received: u64,
    /// More in `success` or `dead_letter`: transactions finished.
    pub finished: u64,
}

impl Rates {
    pub fn per_minute(n: u64, window: ChronoDuration) -> f64 {
        let minutes = window.num_milliseconds() as f64 / 60_000.0;
        if minutes <= 0.0 {
            0.0
        } else {
            n as f64 / minutes
        }
    }
}

impl Observed {
    /// Records the counts seen at `at`; keeps a little more than an hour.
    pub fn sample(&self, at: DateTime<Utc>, counts: Counts) {
        let mut s = self.samples.lock().unwrap_or_else(|e| e.into_inner());
        s.push_back((at, counts));
        while s
            .front()
            .is_some_and(|(t, _)| *t < at - ChronoDuration::minutes(65))
        {
            s.pop_front();
        }
    }

    /// Rates over the last hour, or over what has been sampled of it (at
    /// least a minute); `None` before that. Counts that went down (the
    /// ledger's retention removed entries) count as none.
    pub fn rates(&self, now: DateTime<Utc>) -> Option<Rates> {
        let s = self.samples.lock().unwrap_or_else(|e| e.into_inner());
        let (last_at, last) = *s.back()?;
        let (first_at, first) = *s
            .iter()
            .find(|(t, _)| *t >= now - ChronoDuration::hours(1))?;
        let window = last_at - first_at;
        if window < ChronoDuration::minutes(1) {
            return None;
        }
        let finished = |c: &Counts| c.success + c.dead_letter;
        Some(Rates {
            window,
            received: last.total().saturating_sub(first.total()),
            finished: finished(&last).saturating_sub(finished(&first)),
        })
    }

    pub fn last_pass(&self) -> Option<LastPass> {
        self.reconciler
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// The overview's numbers; each part that could not be read says why.
#[derive(Debug, Clone)]
pub struct Overview {
    pub at: DateTime<Utc>,
    pub counts: Result<Counts, String>,
    pub oldest_pending: Result<Option<DateTime<Utc>>, String>,
    /// Messages in the dead-letter queue (at most [`DEAD_LETTERS_READ`]
    /// counted) and whether there are more.
    pub dead_letter_messages: Result<(usize, bool), String>,
    pub rates: Option<Rates>,
    pub last_pass: Option<LastPass>,
}

/// One dead-lettered message.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    pub sequence_number: i64,
    pub message_id: String,
    /// The ledger key of its transaction (none: a message naming none).
    pub key: Option<String>,
    pub reason: String,
    pub description: Option<String>,
    pub enqueued_at: DateTime<Utc>,
    pub delivery_count: u32,
}

impl DeadLetter {
    fn of(m: &ReceivedMessage) -> DeadLetter {
        DeadLetter {
            sequence_number: m.sequence_number,
            message_id: m.message_id.clone(),
            key: transaction_id_of(m).map(str::to_owned),
            reason: m
                .dead_letter_reason
                .clone()
                .unwrap_or_else(|| NO_REASON.into()),
            description: m.dead_letter_description.clone(),
            enqueued_at: m.enqueued_at,
            delivery_count: m.delivery_count,
        }
    }
}

/// The group of dead letters without a reason.
pub const NO_REASON: &str = "(no reason)";

/// Dead letters with one reason, as ServicePulse groups failed messages.
#[derive(Debug, Clone)]
pub struct DeadLetterGroup {
    pub reason: String,
    pub messages: Vec<DeadLetter>,
}

/// One payment's history, oldest first.
#[derive(Debug)]
pub struct Timeline {
    pub record: TxRecord,
    /// The WAL record, or why it could not be read.
    pub wal: Result<WalRecord, String>,
    /// The payload as shown (redacted).
    pub payload: Option<Shown>,
    pub events: Vec<Event>,
    /// The journal windows read ([`TIMELINE_JOURNAL_SPAN`] after receipt,
    /// and before the last change), one when they meet.
    pub journal_read: Vec<(DateTime<Utc>, DateTime<Utc>)>,
    pub journal_error: Option<String>,
    /// This payment's messages in the dead-letter queue.
    pub dead_letters: Vec<DeadLetter>,
}

/// A step of a payment's timeline.
#[derive(Debug, Clone)]
pub enum Event {
    /// Written to the WAL and acknowledged.
    Received {
        at: DateTime<Utc>,
        vendor: Option<String>,
        remote_addr: Option<String>,
        wal_ref: WalRef,
        sha256: Sha256,
    },
    /// A journal entry: an attempt's outcome, a replay, a purge, a refusal.
    Journaled(JournalEntry),
}

impl Event {
    pub fn at(&self) -> DateTime<Utc> {
        match self {
            Event::Received { at, .. } => *at,
            Event::Journaled(e) => e.at,
        }
    }
}

/// A payment found by a search.
#[derive(Debug, Clone)]
pub struct Found {
    pub key: String,
    pub received_at: DateTime<Utc>,
    pub wal_ref: WalRef,
    /// Its state in the ledger now (`None`: not in the ledger).
    pub state: Option<State>,
}

/// What a replay action takes.
#[derive(Debug, Clone, PartialEq)]
pub enum Selection {
    /// One transaction, in the state the operator saw; `force` replays a
    /// `success` (the downstream is called again).
    Transaction {
        key: TransactionId,
        seen: State,
        force: bool,
    },
    /// Dead-lettered messages: one, a reason's group, or those
    /// dead-lettered in a time range.
    DeadLetters(DeadLetterPick),
}

#[derive(Debug, Clone, PartialEq)]
pub enum DeadLetterPick {
    One(i64),
    Reason(String),
    Between(DateTime<Utc>, DateTime<Utc>),
}

impl DeadLetterPick {
    fn takes(&self, d: &DeadLetter) -> bool {
        match self {
            DeadLetterPick::One(seq) => d.sequence_number == *seq,
            DeadLetterPick::Reason(r) => d.reason == *r,
            DeadLetterPick::Between(from, to) => d.enqueued_at >= *from && d.enqueued_at <= *to,
        }
    }
}

/// A replay's dry run: what it would take, and what each is now.
#[derive(Debug, Clone, Default)]
pub struct Plan {
    pub items: Vec<PlanItem>,
    /// The dead-lettered messages picked (removed once their transaction is
    /// replayed).
    pub sequence_numbers: Vec<i64>,
    /// Picked messages that name no transaction (`rtpd dlq purge` removes them).
    pub without_transaction: Vec<DeadLetter>,
    /// More than [`MAX_BULK`] were picked; the rest wait for another action.
    pub truncated: bool,
    pub force: bool,
    /// The state each must still be in when replayed.
    pub expect: Option<State>,
}

impl Plan {
    pub fn would_replay(&self) -> usize {
        self.items.iter().filter(|i| i.would_replay).count()
    }
}

#[derive(Debug, Clone)]
pub struct PlanItem {
    pub key: String,
    /// Its ledger state now (`None`: not in the ledger).
    pub now: Option<State>,
    pub would_replay: bool,
}

/// What a replay action did, per transaction.
#[derive(Debug)]
pub struct Done {
    pub items: Vec<(String, ItemDone)>,
    /// Dead-lettered messages removed, of those of replayed transactions.
    pub removed: usize,
    pub to_remove: usize,
}

#[derive(Debug)]
pub enum ItemDone {
    Replayed {
        message_id: String,
        due_at: Option<DateTime<Utc>>,
    },
    /// Not now: its state (another than expected, a live claim, a success).
    Refused(State),
    /// Its success is journaled; the ledger catches up (no replay without force).
    JournaledSuccess,
    NotFound,
}

/// A WAL hour partition.
#[derive(Debug, Clone)]
pub struct WalHour {
    pub hour: DateTime<Utc>,
    pub segments: usize,
    pub bytes: u64,
    /// Records, as the segments' metadata says (`rtpd wal ls` reads the same).
    pub records: usize,
    /// Segments whose metadata gives no count (written by an older version).
    pub uncounted: usize,
}

/// A WAL segment as listed.
#[derive(Debug, Clone)]
pub struct WalSegmentInfo {
    pub key: String,
    pub bytes: u64,
    /// From its metadata, else read (`None`: neither).
    pub records: Option<usize>,
}

/// A WAL segment and its records.
#[derive(Debug, Clone)]
pub struct WalSegment {
    pub key: String,
    /// Each record's reference and transaction key (`None`: unreadable).
    pub records: Vec<(WalRef, Option<String>)>,
}

fn records_in(info: &crate::wal::store::ObjectInfo) -> Option<usize> {
    info.metadata.get("records").and_then(|r| r.parse().ok())
}

/// Whether `key` names a WAL object (not the journal's or the rejected
/// calls', which share the store).
fn is_wal_key(key: &str) -> bool {
    key.strip_prefix(crate::wal::WAL_PREFIX)
        .is_some_and(|rest| rest.starts_with('/'))
}

/// The windows of the journal a timeline reads for `r`: after its receipt,
/// and before its last change; one window when they meet.
pub fn journal_windows(r: &TxRecord, now: DateTime<Utc>) -> Vec<(DateTime<Utc>, DateTime<Utc>)> {
    let first = (
        r.created_at,
        (r.created_at + TIMELINE_JOURNAL_SPAN).min(now),
    );
    let last_to = r.updated_at.max(r.created_at).min(now);
    let last = ((last_to - TIMELINE_JOURNAL_SPAN).max(r.created_at), last_to);
    if last.0 <= first.1 {
        vec![(first.0, first.1.max(last.1))]
    } else {
        vec![first, last]
    }
}

impl Console {
    pub fn new(replayer: Replayer, redaction: Redaction, observed: Observed) -> Console {
        Console {
            replayer,
            redaction,
            observed,
            last_overview: Default::default(),
        }
    }

    fn ledger(&self) -> &dyn crate::ledger::Ledger {
        &*self.replayer.ledger
    }

    /// The overview's numbers: read now, or the last read while it is
    /// younger than [`OVERVIEW_REUSED_FOR`] (each open overview polls; a
    /// dead-letter count on Service Bus is several peeks).
    pub async fn overview(&self) -> Overview {
        let mut last = self.last_overview.lock().await;
        if let Some((at, o)) = last.as_ref()
            && at.elapsed() < OVERVIEW_REUSED_FOR
        {
            return o.clone();
        }
        let o = self.read_overview().await;
        *last = Some((tokio::time::Instant::now(), o.clone()));
        o
    }

    async fn read_overview(&self) -> Overview {
        let now = crate::clock::now();
        let counts = self.ledger().counts().await.map_err(|e| e.to_string());
        if let Ok(c) = &counts {
            self.observed.sample(now, *c);
        }
        let oldest_pending = self
            .ledger()
            .oldest_update(State::Pending)
            .await
            .map_err(|e| e.to_string());
        let dead_letter_messages = self
            .peek_dead_letters()
            .await
            .map(|(m, more)| (m.len(), more))
            .map_err(|e| e.to_string());
        Overview {
            at: now,
            counts,
            oldest_pending,
            dead_letter_messages,
            rates: self.observed.rates(now),
            last_pass: self.observed.last_pass(),
        }
    }

    /// The dead-lettered messages, at most [`DEAD_LETTERS_READ`], and
    /// whether there are more.
    async fn peek_dead_letters(&self) -> Result<(Vec<ReceivedMessage>, bool), ConsoleError> {
        let mut out = Vec::new();
        let mut from = 0i64;
        loop {
            let want = (DEAD_LETTERS_READ + 1 - out.len()).min(250);
            let batch = self.replayer.queue.peek_dead_letters(from, want).await?;
            let Some(last) = batch.last() else { break };
            from = last.sequence_number + 1;
            out.extend(batch);
            if out.len() > DEAD_LETTERS_READ {
                out.truncate(DEAD_LETTERS_READ);
                return Ok((out, true));
            }
        }
        Ok((out, false))
    }

    /// Dead letters grouped by reason, largest group first; and whether
    /// the queue holds more than were read.
    pub async fn dead_letter_groups(&self) -> Result<(Vec<DeadLetterGroup>, bool), ConsoleError> {
        let (msgs, more) = self.peek_dead_letters().await?;
        let mut groups: BTreeMap<String, Vec<DeadLetter>> = BTreeMap::new();
        for m in &msgs {
            let d = DeadLetter::of(m);
            groups.entry(d.reason.clone()).or_default().push(d);
        }
        let mut groups: Vec<DeadLetterGroup> = groups
            .into_iter()
            .map(|(reason, messages)| DeadLetterGroup { reason, messages })
            .collect();
        groups.sort_by_key(|g| std::cmp::Reverse(g.messages.len()));
        Ok((groups, more))
    }

    /// The transactions an operator may mean by `id`: the one of `vendor`,
    /// else the bare id's and each of `vendors`' (as the API resolves it).
    pub async fn find_by_id(
        &self,
        id: &TransactionId,
        vendor: Option<&str>,
        vendors: &[String],
    ) -> Result<Vec<TxRecord>, ConsoleError> {
        match vendor.filter(|v| !v.is_empty()) {
            Some(v) => {
                let key = TransactionId::scoped(Some(v), id)?;
                Ok(crate::ledger::find(self.ledger(), &key)
                    .await?
                    .into_iter()
                    .collect())
            }
            None => Ok(crate::ledger::find_across_vendors(self.ledger(), id, vendors).await?),
        }
    }

    /// Payments received in `[from, to]` (of `vendor`, if given), from the
    /// WAL, oldest first: at most [`FIND_MAX_SHOWN`], reading at most
    /// [`FIND_MAX_RECORDS`] records; and whether the search stopped short.
    pub async fn find_received(
        &self,
        vendor: Option<&str>,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
    ) -> Result<(Vec<Found>, bool), ConsoleError> {
        let wal = &self.replayer.wal;
        let mut found = Vec::new();
        let mut read = 0usize;
        for seg in wal.segments(from, to).await? {
            for (r, bytes) in wal.read_segment(&seg.key).await? {
                read += 1;
                if read > FIND_MAX_RECORDS || found.len() >= FIND_MAX_SHOWN {
                    return self.with_states(found).await.map(|f| (f, true));
                }
                let Ok(w) = serde_json::from_slice::<WalRecord>(&bytes) else {
                    continue;
                };
                if w.received_at < from
                    || w.received_at > to
                    || vendor.is_some_and(|v| w.source.vendor.as_deref() != Some(v))
                {
                    continue;
                }
                if let Ok(key) = w.key() {
                    found.push(Found {
                        key: key.to_string(),
                        received_at: w.received_at,
                        wal_ref: r,
                        state: None,
                    });
                }
            }
        }
        found.sort_by_key(|f| f.received_at);
        self.with_states(found).await.map(|f| (f, false))
    }

    async fn with_states(&self, mut found: Vec<Found>) -> Result<Vec<Found>, ConsoleError> {
        for f in &mut found {
            let key = TransactionId::parse_key(&f.key)?;
            f.state = crate::ledger::find(self.ledger(), &key)
                .await?
                .filter(|r| r.wal_ref == f.wal_ref)
                .map(|r| r.status);
        }
        Ok(found)
    }

    /// The ledger record of `key` (a `<vendor>/<id>` key, or a bare id).
    pub async fn record(&self, key: &str) -> Result<Option<TxRecord>, ConsoleError> {
        let key = TransactionId::parse_key(key)?;
        Ok(crate::ledger::find(self.ledger(), &key).await?)
    }

    /// The timeline of the transaction with this ledger key.
    pub async fn timeline(&self, key: &str) -> Result<Option<Timeline>, ConsoleError> {
        let Some(record) = self.record(key).await? else {
            return Ok(None);
        };
        let wal = load_record(&self.replayer.wal, &record.wal_ref)
            .await
            .map_err(|e| e.to_string());
        let payload = wal.as_ref().ok().map(|w| self.redaction.shown(&w.payload));
        let mut events = vec![Event::Received {
            at: record.created_at,
            vendor: record.vendor.clone(),
            remote_addr: wal.as_ref().ok().and_then(|w| w.source.remote_addr.clone()),
            wal_ref: record.wal_ref.clone(),
            sha256: record.sha256.clone(),
        }];
        let journal_read = journal_windows(&record, crate::clock::now());
        let mut index = JournalIndex::default();
        let mut journal_error = None;
        for (from, to) in &journal_read {
            // Segments are filed under their writer's hour: a little either side.
            let margin = ChronoDuration::minutes(5);
            if let Err(e) = index
                .refresh(&self.replayer.journal, *from - margin, *to + margin, true)
                .await
            {
                journal_error = Some(e.to_string());
            }
        }
        let id = record.transaction_id.to_string();
        events.extend(index.entries_of(&id).iter().cloned().map(Event::Journaled));
        events.sort_by_key(Event::at);
        let dead_letters = self
            .peek_dead_letters()
            .await
            .map(|(m, _)| {
                m.iter()
                    .map(DeadLetter::of)
                    .filter(|d| d.key.as_deref() == Some(id.as_str()))
                    .collect()
            })
            .unwrap_or_default();
        Ok(Some(Timeline {
            record,
            wal,
            payload,
            events,
            journal_read,
            journal_error,
            dead_letters,
        }))
    }

    /// The dry run of a replay: what `selection` takes and whether each
    /// would be replayed now.
    pub async fn plan(&self, selection: &Selection) -> Result<Plan, ConsoleError> {
        let now = crate::clock::now();
        match selection {
            Selection::Transaction { key, seen, force } => {
                let force = *force && *seen == State::Success;
                let current = crate::ledger::find(self.ledger(), key).await?;
                // Its dead-lettered messages go once it is replayed, as
                // `rtpd dlq replay <key>` removes them.
                let sequence_numbers = match &current {
                    Some(r) => {
                        let (msgs, _) = self.peek_dead_letters().await?;
                        let key = r.transaction_id.as_str();
                        msgs.iter()
                            .filter(|m| transaction_id_of(m) == Some(key))
                            .map(|m| m.sequence_number)
                            .collect()
                    }
                    None => Vec::new(),
                };
                let item = PlanItem {
                    key: current
                        .as_ref()
                        .map_or_else(|| key.to_string(), |r| r.transaction_id.to_string()),
                    now: current.as_ref().map(|r| r.status),
                    would_replay: current
                        .as_ref()
                        .is_some_and(|r| r.status == *seen && machine::may_replay(r, force, now)),
                };
                Ok(Plan {
                    items: vec![item],
                    sequence_numbers,
                    force,
                    expect: Some(*seen),
                    ..Plan::default()
                })
            }
            Selection::DeadLetters(pick) => {
                let (msgs, _) = self.peek_dead_letters().await?;
                let picked: Vec<DeadLetter> = msgs
                    .iter()
                    .map(DeadLetter::of)
                    .filter(|d| pick.takes(d))
                    .collect();
                let mut plan = Plan {
                    expect: Some(State::DeadLetter),
                    ..Plan::default()
                };
                let mut keys = BTreeSet::new();
                for d in picked {
                    match &d.key {
                        None => plan.without_transaction.push(d),
                        Some(k) => {
                            if !keys.contains(k) && keys.len() >= MAX_BULK {
                                plan.truncated = true;
                                continue;
                            }
                            keys.insert(k.clone());
                            plan.sequence_numbers.push(d.sequence_number);
                        }
                    }
                }
                for key in keys {
                    let current =
                        crate::ledger::find(self.ledger(), &TransactionId::parse_key(&key)?)
                            .await?;
                    plan.items.push(PlanItem {
                        would_replay: current.as_ref().is_some_and(|r| {
                            r.status == State::DeadLetter && machine::may_replay(r, false, now)
                        }),
                        now: current.map(|r| r.status),
                        key,
                    });
                }
                Ok(plan)
            }
        }
    }

    /// Carries out a confirmed plan: replays each of `keys` as `req` says
    /// (its operator and reason are journaled), paced as `rtpd dlq replay`,
    /// then removes the dead-lettered messages `sequence_numbers` of the
    /// transactions replayed — the steps of `rtpd dlq replay <SEQ>…`.
    pub async fn replay(
        &self,
        keys: &[String],
        sequence_numbers: &[i64],
        req: &ReplayRequest,
    ) -> Result<Done, ConsoleError> {
        let pace = std::time::Duration::from_secs_f64(1.0 / f64::from(BULK_RATE_PER_SEC));
        let mut items = Vec::new();
        let mut replayed = BTreeSet::new();
        for (n, key) in keys.iter().take(MAX_BULK).enumerate() {
            if n > 0 {
                tokio::time::sleep(pace).await;
            }
            let done = match self.replayer.replay_one(key, req).await? {
                Replayed::Requeued { record, message_id } => {
                    replayed.insert(key.clone());
                    ItemDone::Replayed {
                        message_id,
                        due_at: record.next_retry_at.filter(|t| *t > crate::clock::now()),
                    }
                }
                Replayed::Refused(r) => ItemDone::Refused(r.status),
                Replayed::JournaledSuccess(_) => ItemDone::JournaledSuccess,
                Replayed::NotFound => ItemDone::NotFound,
            };
            items.push((key.clone(), done));
        }
        let (mut removed, mut to_remove) = (0, 0);
        if !sequence_numbers.is_empty() && !replayed.is_empty() {
            let seqs: BTreeSet<i64> = sequence_numbers.iter().copied().collect();
            let take = |m: &ReceivedMessage| {
                seqs.contains(&m.sequence_number)
                    && transaction_id_of(m).is_some_and(|k| replayed.contains(k))
            };
            let (msgs, _) = self.peek_dead_letters().await?;
            to_remove = msgs.iter().filter(|m| take(m)).count();
            removed = self.replayer.settle_dead_letters(take).await?;
        }
        Ok(Done {
            items,
            removed,
            to_remove,
        })
    }

    /// The WAL's 24 hour partitions of the day starting at `day`.
    pub async fn wal_hours(&self, day: DateTime<Utc>) -> Result<Vec<WalHour>, ConsoleError> {
        let mut hours = Vec::new();
        for h in 0..24 {
            let hour = day + ChronoDuration::hours(h);
            let segs = self.replayer.wal.segments(hour, hour).await?;
            let counts: Vec<Option<usize>> = segs.iter().map(records_in).collect();
            hours.push(WalHour {
                hour,
                segments: segs.len(),
                bytes: segs.iter().map(|s| s.size).sum(),
                records: counts.iter().flatten().sum(),
                uncounted: counts.iter().filter(|c| c.is_none()).count(),
            });
        }
        Ok(hours)
    }

    /// The segments of one WAL hour with their record counts (from their
    /// metadata; a segment without it is read, at most [`WAL_SEGMENTS_READ`]).
    pub async fn wal_hour(&self, hour: DateTime<Utc>) -> Result<Vec<WalSegmentInfo>, ConsoleError> {
        let wal = &self.replayer.wal;
        let mut reads = 0;
        let mut out = Vec::new();
        for seg in wal.segments(hour, hour).await? {
            let records = match records_in(&seg) {
                Some(n) => Some(n),
                None if reads < WAL_SEGMENTS_READ => {
                    reads += 1;
                    Some(wal.read_segment(&seg.key).await?.len())
                }
                None => None,
            };
            out.push(WalSegmentInfo {
                key: seg.key,
                bytes: seg.size,
                records,
            });
        }
        Ok(out)
    }

    /// One WAL segment's records.
    pub async fn wal_segment(&self, key: &str) -> Result<WalSegment, ConsoleError> {
        if !is_wal_key(key) {
            return Err(ConsoleError::Invalid(format!("{key} is not a WAL segment")));
        }
        let records = self
            .replayer
            .wal
            .read_segment(key)
            .await?
            .into_iter()
            .map(|(r, bytes)| {
                let key = serde_json::from_slice::<WalRecord>(&bytes)
                    .ok()
                    .and_then(|w| w.key().ok())
                    .map(|k| k.to_string());
                (r, key)
            })
            .collect();
        Ok(WalSegment {
            key: key.to_owned(),
            records,
        })
    }

    /// One WAL record, its sha256 checked.
    pub async fn wal_record(&self, r: &WalRef) -> Result<WalRecord, ConsoleError> {
        if !is_wal_key(&r.key) {
            return Err(ConsoleError::Invalid(format!("{r} is not in the WAL")));
        }
        Ok(load_record(&self.replayer.wal, r).await?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(total_pending: u64, success: u64, dead: u64) -> Counts {
        Counts {
            pending: total_pending,
            success,
            dead_letter: dead,
            ..Counts::default()
        }
    }

    #[test]
    fn rates_need_a_minute_of_samples_and_cover_the_last_hour() {
        let o = Observed::default();
        let t0 = Utc::now() - ChronoDuration::minutes(90);
        assert_eq!(o.rates(t0), None);
        o.sample(t0, counts(0, 0, 0));
        o.sample(t0 + ChronoDuration::seconds(30), counts(5, 0, 0));
        assert_eq!(
            o.rates(t0 + ChronoDuration::seconds(30)),
            None,
            "under a minute"
        );
        // An hour later: the samples from before the last hour are left out.
        let t1 = t0 + ChronoDuration::minutes(40);
        o.sample(t1, counts(10, 100, 2));
        let t2 = t0 + ChronoDuration::minutes(90);
        o.sample(t2, counts(10, 160, 2));
        let r = o.rates(t2).unwrap();
        assert_eq!(r.window, ChronoDuration::minutes(50));
        assert_eq!(r.received, 60);
        assert_eq!(r.finished, 60);
        assert!((Rates::per_minute(r.received, r.window) - 1.2).abs() < 1e-9);
    }

    #[test]
    fn counts_that_go_down_are_no_negative_rate() {
        let o = Observed::default();
        let t = Utc::now();
        o.sample(t - ChronoDuration::minutes(5), counts(0, 100, 0));
        o.sample(t, counts(0, 50, 0));
        let r = o.rates(t).unwrap();
        assert_eq!((r.received, r.finished), (0, 0));
    }

    #[test]
    fn a_timeline_reads_the_journal_after_receipt_and_before_the_last_change() {
        let now = Utc::now();
        let reg = crate::transaction::Registration {
            transaction_id: TransactionId::parse("T").unwrap(),
            sha256: "aa".into(),
            wal_ref: "wal/v1/x#0+1".parse().unwrap(),
            vendor: None,
            received_at: now - ChronoDuration::days(3),
            expires_at: None,
        };
        let mut r = TxRecord::new(&reg, reg.received_at + ChronoDuration::minutes(30));
        // Finished within its first budget: one window.
        let w = journal_windows(&r, now);
        assert_eq!(
            w,
            vec![(r.created_at, r.created_at + TIMELINE_JOURNAL_SPAN)]
        );
        // Replayed three days on: both ends.
        r.updated_at = now - ChronoDuration::minutes(1);
        let w = journal_windows(&r, now);
        assert_eq!(w.len(), 2, "{w:?}");
        assert_eq!(w[1], (r.updated_at - TIMELINE_JOURNAL_SPAN, r.updated_at));
        // A young payment: up to its last change, which is now.
        r.created_at = now - ChronoDuration::minutes(3);
        r.updated_at = now;
        assert_eq!(journal_windows(&r, now), vec![(r.created_at, now)]);
        assert!(is_wal_key("wal/v1/2026/12/01/18/x.ndjson"));
        assert!(!is_wal_key("outcomes/v1/2026/12/01/18/x.ndjson"));
        assert!(!is_wal_key("wal/v10/x"));
    }

    #[test]
    fn dead_letter_picks() {
        let d = DeadLetter {
            sequence_number: 7,
            message_id: "m".into(),
            key: Some("v/T".into()),
            reason: "permanent_failure".into(),
            description: None,
            enqueued_at: Utc::now(),
            delivery_count: 1,
        };
        assert!(DeadLetterPick::One(7).takes(&d));
        assert!(!DeadLetterPick::One(8).takes(&d));
        assert!(DeadLetterPick::Reason("permanent_failure".into()).takes(&d));
        assert!(!DeadLetterPick::Reason("retries_exhausted".into()).takes(&d));
        let h = ChronoDuration::hours(1);
        assert!(DeadLetterPick::Between(d.enqueued_at - h, d.enqueued_at + h).takes(&d));
        assert!(!DeadLetterPick::Between(d.enqueued_at + h, d.enqueued_at + h + h).takes(&d));
    }
}
