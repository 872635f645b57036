//! The ledger port: the index of every transaction's state, used to dedup
//! ingest, fence processors and answer status queries.
//!
//! Contract:
//! - Every operation on one transaction is atomic and linearizable.
//! - `register` creates a `pending` record once; the same id with the same
//!   sha256 is `Duplicate`, with another sha256 `Conflict`. Nothing is overwritten.
//! - `claim` hands out attempt numbers that only grow: the attempt is the
//!   fencing token. It refuses terminal records, unexpired leases of others,
//!   and failed records whose retry is not due.
//! - `settle` succeeds only for the current owner with the current attempt; a
//!   stale owner gets [`LedgerError::Fenced`] and nothing changes. So does
//!   `extend_lease`, which keeps a claim its holder still works on.
//! - Counts by state change in the same atomic step as the state; they are
//!   never computed by scanning.
//! - The ledger is an index, not the source of truth: the WAL and the outcome
//!   journal are, and the ledger can be rebuilt from them.

pub mod local;
pub mod memory;
pub mod postgres;
pub mod redis;

use crate::transaction::{Registration, Settlement, State, TransactionId, TxRecord};
use async_trait::async_trait;
use base64::Engine;
use chrono::{DateTime, Utc};
use serde::Serialize;
use std::time::Duration;

/// A replay's `quiet` for the machine's arithmetic, at most a year (so a
/// time plus it cannot overflow).
pub(crate) fn chrono_quiet(d: Duration) -> chrono::Duration {
    chrono::Duration::from_std(d.min(Duration::from_secs(365 * 86_400))).unwrap_or_default()
}

#[derive(Debug, Clone, PartialEq)]
pub enum RegisterOutcome {
    New(TxRecord),
    Duplicate(TxRecord),
    Conflict(TxRecord),
}

#[derive(Debug, Clone, PartialEq)]
pub enum ClaimOutcome {
    /// The caller owns attempt `record.attempts` until the lease ends.
    Claimed(TxRecord),
    Terminal(TxRecord),
    Busy(TxRecord),
    NotDue(TxRecord),
    NotFound,
}

#[derive(Debug, Clone, PartialEq)]
pub enum ReplayOutcome {
    Reset(TxRecord),
    /// Not allowed in its current state (a `success` without force, or a live claim).
    Refused(TxRecord),
    NotFound,
}

#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error("transaction {id}: attempt {attempt} of {owner} is no longer the current claim")]
    Fenced {
        id: String,
        owner: String,
        attempt: u32,
    },
    #[error("transaction {0} not found")]
    NotFound(String),
    /// A list cursor this ledger did not hand out.
    #[error("invalid cursor")]
    InvalidCursor,
    #[error("ledger unavailable: {0}")]
    Unavailable(String),
    /// The ledger lost what it held (a Redis flushed, or restarted without
    /// its data) or was never marked intact, and is not rebuilt yet:
    /// `register` refuses, since an id acknowledged before the loss would
    /// look new (see [`Ledger::intact`]).
    #[error("ledger lost its data and is being rebuilt from the WAL: {0}")]
    Lost(String),
    #[error("ledger error: {0}")]
    Fatal(String),
}

impl crate::backoff::Transient for LedgerError {
    fn transient(&self) -> bool {
        matches!(self, LedgerError::Unavailable(_))
    }
}

impl LedgerError {
    pub fn is_retryable(&self) -> bool {
        matches!(self, LedgerError::Unavailable(_) | LedgerError::Lost(_))
    }
}

#[derive(Debug, Clone, Default)]
pub struct ListQuery {
    pub state: Option<State>,
    pub limit: usize,
    pub cursor: Option<String>,
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Page {
    pub items: Vec<TxRecord>,
    pub next_cursor: Option<String>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Counts {
    pub pending: u64,
    pub processing: u64,
    pub success: u64,
    pub failed: u64,
    pub dead_letter: u64,
}

impl Counts {
    pub fn total(&self) -> u64 {
        self.pending + self.processing + self.success + self.failed + self.dead_letter
    }

    pub fn by_state(&self) -> [(State, u64); 5] {
        [
            (State::Pending, self.pending),
            (State::Processing, self.processing),
            (State::Success, self.success),
            (State::Failed, self.failed),
            (State::DeadLetter, self.dead_letter),
        ]
    }

    pub fn slot(&mut self, s: State) -> &mut u64 {
        match s {
            State::Pending => &mut self.pending,
            State::Processing => &mut self.processing,
            State::Success => &mut self.success,
            State::Failed => &mut self.failed,
            State::DeadLetter => &mut self.dead_letter,
        }
    }
}

/// Marks a ledger intact that has nothing before it (a test's new ledger):
/// [`Ledger::begin_rebuild`] and [`Ledger::mark_intact`] with no rebuild
/// between. A service never does this: it rebuilds first
/// (`Reconciler::rebuild_if_lost`).
pub async fn mark_new(ledger: &dyn Ledger) -> Result<(), LedgerError> {
    ledger.begin_rebuild("new").await?;
    if ledger.mark_intact("new").await? {
        Ok(())
    } else {
        Err(LedgerError::Lost(
            "lost again while it was being marked".into(),
        ))
    }
}

/// List order is newest update first; a cursor is the last item's position.
/// The transactions a bare `id` may mean when no vendor is named (an
/// operator's view): the entry under the bare id, and each of `vendors`'
/// own. More than one is ambiguous; the HTTP API and `rtpd replay` both
/// refuse to guess.
pub async fn find_across_vendors(
    ledger: &dyn Ledger,
    id: &TransactionId,
    vendors: &[String],
) -> Result<Vec<TxRecord>, LedgerError> {
    let candidates = std::iter::once(id.to_string()).chain(
        vendors
            .iter()
            .filter_map(|v| TransactionId::scoped(Some(v), id).ok())
            .map(|k| k.to_string()),
    );
    let mut found = Vec::new();
    for key in candidates {
        if let Some(r) = ledger.get(&key).await? {
            found.push(r);
        }
    }
    Ok(found)
}

/// A transaction by its key. For a vendor's `<vendor>/<id>` key, an entry
/// written before keys were scoped by vendor (under the bare id) is that
/// vendor's transaction if the entry records that vendor; one recording
/// another vendor (or none) is not.
pub async fn find(
    ledger: &dyn Ledger,
    key: &TransactionId,
) -> Result<Option<TxRecord>, LedgerError> {
    let (Some(vendor), Some(bare)) = (key.scope(), key.unscoped()) else {
        return ledger.get(key).await;
    };
    Ok(ledger
        .get_first(&[key.as_str(), bare.as_str()])
        .await?
        .filter(|r| r.transaction_id == *key || r.vendor.as_deref() == Some(vendor)))
}

/// Whether `a` and `b` are the same version of a record: every transition
/// (claim, settle, replay, restore) changes at least one of these fields.
/// Times compare at the microsecond, the precision every ledger stores.
pub fn same_version(a: &TxRecord, b: &TxRecord) -> bool {
    a.transaction_id == b.transaction_id
        && a.status == b.status
        && a.attempts == b.attempts
        && a.replay_nonce == b.replay_nonce
        && a.lease_owner == b.lease_owner
        && a.updated_at.timestamp_micros() == b.updated_at.timestamp_micros()
}

pub fn encode_cursor(updated_at_us: i64, id: &str) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!("{updated_at_us}:{id}"))
}

pub fn decode_cursor(c: &str) -> Option<(i64, String)> {
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(c)
        .ok()?;
    let s = String::from_utf8(raw).ok()?;
    let (t, id) = s.split_once(':')?;
    Some((t.parse().ok()?, id.to_owned()))
}

#[async_trait]
pub trait Ledger: Send + Sync + 'static {
    async fn register(&self, reg: Registration) -> Result<RegisterOutcome, LedgerError>;
    /// `register` with the payload bytes at hand (a UTF-8 JSON object), for
    /// a ledger configured to keep a copy of them for SQL queries
    /// (PostgreSQL with `RTPD_POSTGRES_PAYLOAD`); the others ignore them.
    async fn register_with_payload(
        &self,
        reg: Registration,
        _payload: &[u8],
    ) -> Result<RegisterOutcome, LedgerError> {
        self.register(reg).await
    }
    async fn get(&self, id: &str) -> Result<Option<TxRecord>, LedgerError>;
    /// The entry of the first of `ids` the ledger holds, in the order given
    /// (a vendor-scoped key, then the bare id of an entry written before
    /// keys were scoped). One round trip where the store allows it
    /// (PostgreSQL overrides this); by default one `get` each.
    async fn get_first(&self, ids: &[&str]) -> Result<Option<TxRecord>, LedgerError> {
        for id in ids {
            if let Some(r) = self.get(id).await? {
                return Ok(Some(r));
            }
        }
        Ok(None)
    }
    async fn claim(
        &self,
        id: &str,
        owner: &str,
        lease: Duration,
    ) -> Result<ClaimOutcome, LedgerError>;
    async fn settle(
        &self,
        id: &str,
        owner: &str,
        attempt: u32,
        s: Settlement,
    ) -> Result<TxRecord, LedgerError>;
    /// Extends the lease of a claim the caller still holds — `owner` at
    /// `attempt`, still `processing` (`machine::holds`) — to `lease` from
    /// now by the clock `claim` reads, never shortening it. A worker whose
    /// call or outcome takes longer than the lease it claimed with keeps
    /// the transaction this way, so no one else takes it over meanwhile. A
    /// lapsed lease that nobody took over is the caller's again (no other
    /// attempt can have started: that would have raised the attempt
    /// number). [`LedgerError::Fenced`] (nothing changes) when the claim
    /// was taken over, settled or replayed; `NotFound` for an unknown id.
    async fn extend_lease(
        &self,
        id: &str,
        owner: &str,
        attempt: u32,
        lease: Duration,
    ) -> Result<TxRecord, LedgerError>;
    /// Gives back a claim under which no downstream call was made — `owner`
    /// at `attempt` still holds it (`machine::holds`) —
    /// (`machine::apply_release`): a worker that gives the message back
    /// before calling (the journal or the ledger failed between its claim
    /// and its call) does not leave an attempt counted without an outcome.
    /// Enough of those dead-lettered as a crash loop a payment no call had
    /// been made for (issue 12). [`LedgerError::Fenced`] (nothing changes)
    /// when the claim was taken over, settled or replayed; `NotFound` for
    /// an unknown id.
    async fn release(&self, id: &str, owner: &str, attempt: u32) -> Result<TxRecord, LedgerError>;
    /// Operator replay (`machine::may_replay`, `machine::apply_replay`):
    /// back to `pending` with a fresh retry budget, due no sooner than
    /// `quiet` after a failed or dead-lettered attempt ended or a lapsed
    /// claim's lease (a call that timed out, or whose process died, may
    /// still run at the downstream; the replayer passes the processor's lock
    /// duration + downstream timeout).
    async fn replay(
        &self,
        id: &str,
        nonce: &str,
        force: bool,
        quiet: Duration,
    ) -> Result<ReplayOutcome, LedgerError>;
    /// The record after a replay `nonce` whose answer was lost (an error or
    /// a timeout): final, in that if it does not carry `nonce`, that replay
    /// never takes effect later (the replayer then journals a withdraw;
    /// issue 12, N2). A ledger whose calls can still run after the caller
    /// gave up on them and out of order with later calls (PostgreSQL: a
    /// pool of connections, an UPDATE queued behind a row lock) fences the
    /// replay first. Here: a read, enough where calls run in the order they
    /// were sent (memory; SQLite's one job queue; Redis's one multiplexed
    /// connection, unless it reconnected between the two).
    async fn replay_fate(&self, id: &str, nonce: &str) -> Result<Option<TxRecord>, LedgerError> {
        let _ = nonce;
        self.get(id).await
    }
    /// Puts a record as rebuilt from the WAL and journal, replacing what is
    /// there (ledger rebuild only).
    async fn restore(&self, rec: TxRecord) -> Result<(), LedgerError>;
    /// Puts a rebuilt record only if the id is absent, atomically (the
    /// processor and the reconciler may race to restore the same id).
    /// Returns whether it was put.
    async fn restore_missing(&self, rec: TxRecord) -> Result<bool, LedgerError>;
    /// Puts a repaired record only if the id's record is still the version
    /// `seen` (read earlier: same state, attempt, replay nonce, lease owner
    /// and last update, see [`same_version`]), atomically. A repair the
    /// reconciler or a rebuild computed from an earlier read then never
    /// overwrites a newer state a live processor or an operator wrote
    /// meanwhile (issue 12 item 8). Returns whether it was put; an absent id
    /// is not `seen` (use [`Ledger::restore_missing`]).
    async fn restore_if_unchanged(
        &self,
        seen: &TxRecord,
        rec: TxRecord,
    ) -> Result<bool, LedgerError>;
    /// Acquires the named lease for `owner`, or renews it if `owner` holds it,
    /// for `ttl` from now. False when another owner holds an unexpired lease.
    /// Keeps one reconciler active across instances.
    async fn try_lease(&self, name: &str, owner: &str, ttl: Duration) -> Result<bool, LedgerError>;
    /// A named value every instance sees (the reconciler's low watermark).
    async fn checkpoint(&self, name: &str) -> Result<Option<String>, LedgerError>;
    async fn set_checkpoint(&self, name: &str, value: &str) -> Result<(), LedgerError>;
    async fn list(&self, q: ListQuery) -> Result<Page, LedgerError>;
    async fn counts(&self) -> Result<Counts, LedgerError>;
    /// The least recent `updated_at` among the records in `state` — for
    /// `pending`, since when the oldest waiting transaction has waited — or
    /// `None` when no record is in it. Read from the index `list` uses.
    async fn oldest_update(&self, state: State) -> Result<Option<DateTime<Utc>>, LedgerError>;
    async fn ping(&self) -> Result<(), LedgerError>;
    fn describe(&self) -> String;

    /// Whether the ledger still holds everything registered in it (issue 12,
    /// N1). A ledger that lost its data — a Redis flushed, or restarted
    /// without it; a deleted SQLite file — looks like a new one, and ingest
    /// would take an id acknowledged before the loss for a new transaction
    /// and accept other bytes under it. So a ledger carries a mark, written
    /// only after a rebuild from the WAL ([`Ledger::mark_intact`]) and lost
    /// with the data; without it `register` refuses with
    /// [`LedgerError::Lost`] (checked in the same atomic step as the
    /// registration). A new ledger is unmarked until the first rebuild (over
    /// an empty WAL, a moment). Every wrapper must forward these three.
    async fn intact(&self) -> Result<bool, LedgerError>;
    /// Starts a rebuild: records `token` as the rebuild in progress (in the
    /// ledger itself, so a second loss during the rebuild forgets it).
    async fn begin_rebuild(&self, token: &str) -> Result<(), LedgerError>;
    /// Marks the ledger intact after the rebuild `token` completed — only if
    /// `token` is still the rebuild in progress (or the ledger is already
    /// marked), atomically: a ledger lost again during the rebuild stays
    /// unmarked and is rebuilt again. Whether the ledger is marked now.
    async fn mark_intact(&self, token: &str) -> Result<bool, LedgerError>;
    /// Which of `wal_refs` (WAL records of transaction `id`) had their
    /// registration refused because the ledger had no intact mark,
    /// remembered in the same atomic step as the refusal (and lost with the
    /// ledger's data): a rebuild never restores them, even when intake's
    /// journal note of the refusal is missing. Asked per id, so its cost
    /// follows the records a pass meets, not how many POSTs were refused.
    async fn refused_while_lost(
        &self,
        id: &str,
        wal_refs: &[String],
    ) -> Result<Vec<String>, LedgerError>;
}
