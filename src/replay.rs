//! Operator replay: put a transaction back to `pending` and enqueue a fresh
//! copy of its WAL record. Used by `rtpd replay` and the replay routes.

use crate::envelope::{Delivery, Envelope, transaction_id_of};
use crate::journal::{EntryKind, Journal, JournalEntry};
use crate::ledger::{Ledger, LedgerError, ReplayOutcome};
use crate::queue::{Queue, QueueError, ReceivedMessage};
use crate::transaction::{State, TransactionId, TxRecord, WalRef, machine};
use crate::wal::{Log, WalError, WalRecord};
use bytes::Bytes;
use chrono::Utc;
use std::sync::Arc;
use tracing::Instrument;

/// The ports a replay uses.
#[derive(Clone)]
pub struct Replayer {
    pub wal: Log,
    pub journal: Journal,
    pub ledger: Arc<dyn Ledger>,
    pub queue: Arc<dyn Queue>,
    /// How long after its last failed attempt ended (or its lapsed claim's
    /// lease) a replayed transaction is not due (`Ledger::replay`): the
    /// processor's lock duration + downstream timeout, the window a ledger
    /// restore waits out. An attempt that timed out here, or whose process
    /// died, may still run at the downstream. This process's own settings;
    /// a longer window the processors published ([`publish_window`]) wins.
    pub quiet: std::time::Duration,
}

/// The ledger checkpoint where processors publish their replay window, in
/// milliseconds.
pub const WINDOW_CHECKPOINT: &str = "replay-window-ms";

/// Publishes a processor's replay window (its lock duration + downstream
/// timeout) in the ledger, so a replay made elsewhere — `rtpd replay` run
/// with other settings, an api process configured apart — waits at least
/// as long as the processors' calls may run (issue 12: the window came
/// from the caller's environment). Best effort: a replay without it uses
/// its own settings, as before.
pub async fn publish_window(ledger: &dyn Ledger, window: std::time::Duration) {
    let ms = window.as_millis().to_string();
    if let Err(e) = ledger.set_checkpoint(WINDOW_CHECKPOINT, &ms).await {
        tracing::warn!(error = %e, "could not publish the replay window; replays use their own settings");
    }
}

#[derive(Debug, Clone)]
pub struct ReplayRequest {
    /// Required to replay a `success`.
    pub force: bool,
    pub operator: Operator,
    pub reason: Option<String>,
    /// The state the operator saw (`expected_state`, `--if-state`; a bulk
    /// replay by state sets it): the replay is refused if the transaction
    /// is in another state now — a forced replay of what was `failed` must
    /// not reset a `success` that came in between.
    pub expect: Option<State>,
}

/// Who asked for a replay or a purge, as the journal records it (`actor`):
/// how they came in, and the name that came with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Operator {
    /// Through the HTTP API with an admin token: the token's configured name
    /// (`RTPD_ADMIN_TOKENS[_FILE]`, `<name>:sha256:<hash>`). `api:<name>`.
    AdminToken(String),
    /// Through the HTTP API with `RTPD_AUTH=none`. `api:anonymous`.
    Anonymous,
    /// From the command line with an Entra identity: the principal its
    /// access token names (`alice@contoso.com (oid …)`). `entra:<principal>`.
    Entra(String),
    /// From the command line without one: `--operator`, else `$USER`.
    /// Self-declared, so marked as such: `cli:<name>`.
    Cli(String),
    /// Through the operations console, logged in with an admin token: the
    /// token's configured name. `console:<name>`.
    Console(String),
}

impl std::fmt::Display for Operator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Operator::AdminToken(name) => write!(f, "api:{name}"),
            Operator::Anonymous => f.write_str("api:anonymous"),
            Operator::Entra(principal) => write!(f, "entra:{principal}"),
            Operator::Cli(name) => write!(f, "cli:{name}"),
            Operator::Console(name) => write!(f, "console:{name}"),
        }
    }
}

#[derive(Debug)]
pub enum Replayed {
    Requeued {
        record: TxRecord,
        message_id: String,
    },
    /// Not allowed now (a `success` without force, or a live claim).
    Refused(TxRecord),
    /// Not without force: a lapsed claim whose success the outcome journal
    /// holds (its worker died before settling; the ledger catches up).
    JournaledSuccess(TxRecord),
    NotFound,
}

#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    #[error(transparent)]
    Wal(#[from] WalError),
    #[error(transparent)]
    Queue(#[from] QueueError),
}

/// Reads and checks one transaction's WAL record.
pub async fn load_record(wal: &Log, wal_ref: &WalRef) -> Result<WalRecord, WalError> {
    let bytes = wal.read(wal_ref).await?;
    let rec: WalRecord =
        serde_json::from_slice(&bytes).map_err(|e| WalError::Corrupt(format!("{wal_ref}: {e}")))?;
    if !rec.payload_sha256_matches() {
        return Err(WalError::Corrupt(format!(
            "{wal_ref}: payload does not match its sha256"
        )));
    }
    Ok(rec)
}

impl Replayer {
    /// Replays the transaction with this key (`<vendor>/<id>`, or a bare id
    /// when authentication is off or for an entry written before keys were
    /// scoped by vendor).
    pub async fn replay_one(
        &self,
        key: &str,
        req: &ReplayRequest,
    ) -> Result<Replayed, ReplayError> {
        let span = tracing::info_span!(
            "replay",
            transaction_id = crate::transaction::TransactionId::vendor_part(key),
            transaction_key = %key,
            force = req.force
        );
        self.replay_traced(key, req).instrument(span).await
    }

    async fn replay_traced(&self, key: &str, req: &ReplayRequest) -> Result<Replayed, ReplayError> {
        let Ok(key) = TransactionId::parse_key(key) else {
            return Ok(Replayed::NotFound);
        };
        let Some(current) = crate::ledger::find(&*self.ledger, &key).await? else {
            return Ok(Replayed::NotFound);
        };
        let id = current.transaction_id.to_string();
        let id = id.as_str();
        if !machine::may_replay(&current, req.force, crate::clock::now())
            || req.expect.is_some_and(|s| s != current.status)
        {
            return Ok(Replayed::Refused(current));
        }
        if current.status == State::Processing
            && !req.force
            && self.journaled_success(&current).await?
        {
            // Its worker journaled a success and died before settling
            // (simulation seed 693, found by a reviewer): a replay without
            // force would reset the journal's view too, and the next claim
            // would call again. The reconciler records the success.
            tracing::warn!(transaction_id = %id, "not replayed: its success is journaled, the ledger missed the settle; force replays it");
            return Ok(Replayed::JournaledSuccess(current));
        }
        // Force reaches the ledger only for the `success` read here: a
        // transaction that succeeds between this read and the ledger's step
        // is refused there, not reset (issue 12: a forced replay applied
        // force to whatever the ledger held when it acted).
        let force = req.force && current.status == State::Success;
        let wal = load_record(&self.wal, &current.wal_ref).await?;
        // The replay's trace points back at the vendor's original POST.
        crate::trace_context::link_to(&tracing::Span::current(), wal.trace_parent.as_deref());
        let nonce = Delivery::nonce();
        self.journal
            .append(&JournalEntry {
                v: 1,
                kind: EntryKind::Replay,
                transaction_id: id.to_owned(),
                at: crate::clock::now(),
                // A replay without force of a lapsed claim names its
                // attempt: a success of that attempt journaled around it
                // stands (`JournalIndex::known`).
                attempt: (current.status == State::Processing && !req.force)
                    .then_some(current.attempts),
                state: State::Pending,
                error: None,
                next_retry_at: None,
                actor: req.operator.to_string(),
                reason: Some(match &req.reason {
                    Some(r) => format!(
                        "{r} (replay {nonce}, from {}{})",
                        current.status,
                        if req.force { ", forced" } else { "" }
                    ),
                    None => format!(
                        "replay {nonce}, from {}{}",
                        current.status,
                        if req.force { ", forced" } else { "" }
                    ),
                }),
                sha256: Some(current.sha256.clone()),
                wal_ref: None,
                replay_nonce: Some(nonce.clone()),
                latency_ms: None,
            })
            .await?;
        let quiet = self.window().await;
        let record = match self.ledger.replay(id, &nonce, force, quiet).await {
            Ok(ReplayOutcome::Reset(r)) => r,
            Ok(ReplayOutcome::Refused(r)) => {
                // The record moved on between the check above and the ledger
                // step (a claim came in).
                self.withdraw(id, &nonce, &r, req, "refused by the ledger")
                    .await;
                return Ok(Replayed::Refused(r));
            }
            Ok(ReplayOutcome::NotFound) => return Ok(Replayed::NotFound),
            // The answer may have been lost after the reset took: the nonce
            // says whether it did. The read-back waits out a ledger that is
            // briefly unavailable (simulation seed 456: it failed too, and
            // the journal kept a replay the ledger never took).
            Err(e) => match crate::backoff::patiently("ledger replay_fate", || {
                self.ledger.replay_fate(id, &nonce)
            })
            .await
            {
                Ok(Some(r)) if r.replay_nonce.as_deref() == Some(nonce.as_str()) => {
                    tracing::warn!(error = %e, "the ledger's answer to the replay was lost, but the replay took; carrying on");
                    r
                }
                Ok(Some(r)) => {
                    self.withdraw(id, &nonce, &r, req, &e.to_string()).await;
                    return Err(e.into());
                }
                _ => return Err(e.into()),
            },
        };
        // Under the ledger's key (an entry from before scoping keeps its
        // bare one); the WAL record gives the rest.
        let reg = wal.registration_as(current.transaction_id.clone(), &current.wal_ref);
        let msg = Envelope::new(
            reg,
            Bytes::from(wal.payload.into_bytes()),
            Delivery::Replay(nonce),
        )
        // A replayed retry keeps its backoff (the ledger's `next_retry_at`):
        // the copy is delivered when it is due, not refused as early.
        .scheduled_at(record.next_retry_at.filter(|t| *t > crate::clock::now()))
        .to_message();
        let message_id = msg.message_id.clone();
        self.queue.send(vec![msg]).await?;
        tracing::info!(transaction_id = %id, operator = %req.operator, force = req.force, "transaction replayed");
        Ok(Replayed::Requeued { record, message_id })
    }
}

impl Replayer {
    /// Whether the outcome journal holds a success of `rec`'s bytes since
    /// its last replay (read from when it was received: rare, only for a
    /// lapsed claim).
    async fn journaled_success(&self, rec: &TxRecord) -> Result<bool, ReplayError> {
        let mut index = crate::journal::JournalIndex::default();
        index
            .refresh(&self.journal, rec.created_at, crate::clock::now(), false)
            .await?;
        let id = rec.transaction_id.to_string();
        Ok(index
            .known(&id)
            .is_some_and(|k| k.is_success_of(&rec.sha256)))
    }

    /// The replay window: this process's, or the processors' published one
    /// ([`publish_window`]) when that is longer.
    async fn window(&self) -> std::time::Duration {
        match self.ledger.checkpoint(WINDOW_CHECKPOINT).await {
            Ok(Some(ms)) => match ms.parse::<u64>() {
                Ok(ms) => self.quiet.max(std::time::Duration::from_millis(ms)),
                Err(_) => self.quiet,
            },
            Ok(None) => self.quiet,
            Err(e) => {
                tracing::warn!(error = %e, "could not read the processors' replay window; using this process's");
                self.quiet
            }
        }
    }

    /// Journals that the replay journaled just before did not take, with
    /// the state the ledger still holds, so the journal and the ledger agree
    /// again (the journal's fold goes back to before the replay; see
    /// `JournalIndex::known`). Best effort: if this write fails too, the
    /// journal says `pending` for a transaction the ledger holds in another
    /// state, until the next outcome is journaled.
    async fn withdraw(
        &self,
        id: &str,
        nonce: &str,
        current: &TxRecord,
        req: &ReplayRequest,
        why: &str,
    ) {
        if current.status == State::Pending {
            // A `pending` replay note would read as a replay itself.
            return;
        }
        let entry = JournalEntry {
            v: 1,
            kind: EntryKind::Replay,
            transaction_id: id.to_owned(),
            at: crate::clock::now(),
            attempt: Some(current.attempts),
            state: current.status,
            error: current.error_message.clone(),
            next_retry_at: current.next_retry_at,
            actor: req.operator.to_string(),
            reason: Some(format!("replay {nonce} not applied: {why}")),
            sha256: Some(current.sha256.clone()),
            wal_ref: None,
            replay_nonce: Some(nonce.to_owned()),
            latency_ms: None,
        };
        if let Err(e) = self.journal.append(&entry).await {
            tracing::warn!(error = %e, "could not journal that the replay did not take; the journal says pending until the next outcome");
        }
    }
}

/// Which transactions a bulk replay takes.
#[derive(Debug, Clone)]
pub enum Scope {
    Ids(Vec<String>),
    /// Every transaction in this ledger state (e.g. every `dead_letter`).
    State(State),
    /// Every transaction the WAL received in `[from, to]`.
    Received {
        from: chrono::DateTime<Utc>,
        to: chrono::DateTime<Utc>,
    },
    /// The transactions of the messages in the dead-letter queue.
    DeadLetterQueue,
}

/// The ids a scope covers, at most `limit`, in order, without repeats.
impl Replayer {
    pub async fn select(&self, scope: &Scope, limit: usize) -> Result<Vec<String>, ReplayError> {
        let mut ids: Vec<String> = Vec::new();
        let mut seen = std::collections::HashSet::new();
        let mut push = |id: String, ids: &mut Vec<String>| {
            if ids.len() < limit && seen.insert(id.clone()) {
                ids.push(id);
            }
        };
        match scope {
            Scope::Ids(list) => {
                for id in list {
                    push(id.clone(), &mut ids);
                }
            }
            Scope::State(state) => {
                let mut cursor = None;
                loop {
                    let page = self
                        .ledger
                        .list(crate::ledger::ListQuery {
                            state: Some(*state),
                            limit: 500,
                            cursor,
                        })
                        .await?;
                    for r in page.items {
                        push(r.transaction_id.to_string(), &mut ids);
                    }
                    match page.next_cursor {
                        Some(c) if ids.len() < limit => cursor = Some(c),
                        _ => break,
                    }
                }
            }
            Scope::Received { from, to } => {
                for seg in self.wal.segments(*from, *to).await? {
                    for (_, bytes) in self.wal.read_segment(&seg.key).await? {
                        if let Ok(w) = serde_json::from_slice::<WalRecord>(&bytes)
                            && w.received_at >= *from
                            && w.received_at <= *to
                            && let Ok(key) = w.key()
                        {
                            push(key.to_string(), &mut ids);
                        }
                    }
                }
            }
            Scope::DeadLetterQueue => {
                let mut from = 0i64;
                loop {
                    let batch = self.queue.peek_dead_letters(from, 250).await?;
                    let Some(last) = batch.last() else { break };
                    from = last.sequence_number + 1;
                    for m in batch {
                        if let Some(id) = transaction_id_of(&m) {
                            push(id.to_owned(), &mut ids);
                        }
                    }
                    if ids.len() >= limit {
                        break;
                    }
                }
            }
        }
        Ok(ids)
    }

    /// Locks every dead-lettered message `take` accepts and returns them still
    /// locked (the rest are released). Messages stay locked while the scan runs,
    /// so each is seen once.
    pub async fn lock_dead_letters(
        &self,
        mut take: impl FnMut(&ReceivedMessage) -> bool,
    ) -> Result<Vec<ReceivedMessage>, ReplayError> {
        let mut kept = Vec::new();
        let mut taken = Vec::new();
        loop {
            let batch = self
                .queue
                .receive_dead_letters(100, std::time::Duration::from_millis(500))
                .await?;
            if batch.is_empty() {
                break;
            }
            for m in batch {
                if take(&m) {
                    taken.push(m);
                } else {
                    kept.push(m);
                }
            }
        }
        for m in kept {
            let _ = self.queue.abandon(&m).await;
        }
        Ok(taken)
    }

    /// Removes from the dead-letter queue every message `take` accepts; returns
    /// how many were removed.
    pub async fn settle_dead_letters(
        &self,
        take: impl FnMut(&ReceivedMessage) -> bool,
    ) -> Result<usize, ReplayError> {
        let mut removed = 0;
        for m in self.lock_dead_letters(take).await? {
            match self.queue.complete(&m).await {
                Ok(()) => removed += 1,
                Err(QueueError::LockLost) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(removed)
    }
}
