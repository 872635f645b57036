//! The reconciler: joins the WAL with the ledger and the outcome journal over
//! a time window, repairs the ledger from the two sources of truth and
//! re-drives whatever is overdue, so a lost queue message or a lost ledger
//! entry never loses a transaction and never re-delivers a finished one.
//!
//! For every transaction in the WAL window:
//! - missing from the ledger → restored from the WAL and the journal: a
//!   transaction the journal says finished is restored `success` /
//!   `dead_letter` and not re-driven; anything else is restored with its
//!   journaled attempts (so fencing tokens keep growing) and re-driven;
//! - in the ledger as non-terminal while the journal says it finished (the
//!   ledger lost the settle) → corrected, not re-driven;
//! - `pending` untouched for longer than `pending_after` → re-enqueued;
//! - `failed` whose retry is overdue by `slack` → re-enqueued;
//! - `processing` whose lease expired more than `slack` ago → re-enqueued.
//!
//! A WAL record whose sha256 is not the ledger's (a refused re-POST) does not
//! stand for its id: the record the ledger accepted is matched instead. After
//! the window, the ledger's unfinished states are walked too, so a
//! transaction older than the window (a replayed old one) is re-driven by the
//! same rules.
//!
//! Re-enqueued copies carry a distinct message id (`<id>:redrive:<nonce>`), so
//! Service Bus duplicate detection cannot drop them; the ledger's claim makes
//! a redundant copy harmless.
//!
//! One reconciler is active at a time: passes run under the ledger lease
//! [`LEASE`]. The background task starts each pass at the low watermark
//! [`WATERMARK`] (the oldest `received_at` still non-terminal), kept in the
//! ledger so every instance sees it. `rebuild-ledger` is the same join with
//! re-driving switched off.

use crate::backoff::{Patience, Transient, patiently};
use crate::envelope::{Delivery, Envelope};
use crate::journal::{Journal, JournalIndex, Known, restored_record};
use crate::ledger::{Ledger, LedgerError};
use crate::metrics;
use crate::queue::Queue;
use crate::transaction::{Registration, Sha256, State, TransactionId, TxRecord, WalRef};
use crate::wal::{Log, WalError, WalRecord};
use bytes::Bytes;
use chrono::{DateTime, Duration as ChronoDuration, Utc};
use serde::Serialize;
use std::{
    collections::{BTreeMap, HashSet},
    sync::Arc,
    time::Duration,
};
use tokio::time::Instant;
use tracing::Instrument;

/// The ports the reconciler joins and repairs.
#[derive(Clone)]
pub struct Reconciler {
    pub wal: Log,
    pub journal: Journal,
    pub ledger: Arc<dyn Ledger>,
    pub queue: Arc<dyn Queue>,
    /// Lease owner name of this process.
    pub instance: String,
    /// The longest an attempt by a lost process may still run at the
    /// downstream: the processor's lease (lock duration + downstream
    /// timeout). Unfinished work restored into the ledger is not run again
    /// before it has passed (issue 12 item 4).
    pub in_flight: Duration,
}

/// How long after a WAL record intake's refusal of it is surely journaled
/// (its WAL append, the ledger's answer and the journal append, each with
/// its retries): a pass choosing among several records of one id waits this
/// long past the latest before it reads the refusals.
pub const REFUSAL_SETTLE: Duration = Duration::from_secs(12);

/// How far past its own clock a rebuild after a ledger loss reads the WAL:
/// a record acknowledged just before the loss by an instance whose clock ran
/// ahead carries a later time. (What intake wrote after the loss it refused
/// and noted; the settle wait covers those notes.)
pub const REBUILD_CLOCK_MARGIN: Duration = Duration::from_secs(5);

/// Name of the ledger lease that makes one reconciler active at a time.
pub const LEASE: &str = "reconciler";
/// Name of the ledger checkpoint holding the low watermark (RFC 3339).
pub const WATERMARK: &str = "reconciler.low_watermark";

#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error(transparent)]
    Wal(#[from] WalError),
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    #[error("another instance holds the reconciler lease")]
    LeaseHeld,
}

#[derive(Debug, Clone)]
pub struct ReconcileOptions {
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
    pub pending_after: Duration,
    pub slack: Duration,
    pub dry_run: bool,
    /// Re-drives per second at most (0 = unlimited).
    pub rate_per_sec: u32,
    /// False for a ledger rebuild: repair the ledger, enqueue nothing.
    pub redrive: bool,
    /// False: leave `pending` records alone (their messages are known to be
    /// safe in the queue), still correcting from the journal and re-driving
    /// expired leases and overdue retries.
    pub redrive_pending: bool,
    /// Holds (and renews) the reconciler lease for `owner` during the pass.
    pub lease: Option<LeaseOptions>,
    /// Advanced by one per WAL segment read.
    pub progress: Option<indicatif::ProgressBar>,
    /// A ledger rebuild ([`Reconciler::rebuild`]): once the lease is held
    /// the token is recorded as the rebuild in progress, and a complete pass
    /// marks the ledger intact with it, before the lease is let go.
    pub rebuild_token: Option<String>,
    /// An operator accepts that segments the store will not return are
    /// left out (`rtpd rebuild-ledger --accept-unreadable-segments`): a
    /// pass that skipped some is then still complete. Otherwise it is not:
    /// no intact mark, no watermark moved past them.
    pub accept_unreadable: bool,
    /// A rebuild of a ledger that lost its data: every id missing from it
    /// is restored, however young (a regular pass leaves the youngest to
    /// ingest, whose registration may still be on its way; after a loss no
    /// registration is, and one left out would look new to ingest).
    pub rebuild: bool,
}

#[derive(Debug, Clone)]
pub struct LeaseOptions {
    pub owner: String,
    pub ttl: Duration,
}

impl ReconcileOptions {
    pub fn new(from: DateTime<Utc>, to: DateTime<Utc>, pending_after: Duration) -> Self {
        ReconcileOptions {
            from,
            to,
            pending_after,
            slack: pending_after,
            dry_run: false,
            rate_per_sec: 0,
            redrive: true,
            redrive_pending: true,
            lease: None,
            progress: None,
            rebuild_token: None,
            accept_unreadable: false,
            rebuild: false,
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct ReconcileReport {
    pub segments: u64,
    pub records: u64,
    pub unreadable: u64,
    /// WAL or journal segments the store kept failing to return while it
    /// answered otherwise (skipped, each logged at ERROR with its key).
    pub unreadable_segments: u64,
    pub missing_from_ledger: u64,
    /// Missing from the ledger and finished according to the journal: restored, not re-driven.
    pub restored_finished: u64,
    /// In the ledger as unfinished, finished according to the journal: corrected.
    pub corrected_from_journal: u64,
    pub redriven_pending: u64,
    pub redriven_failed: u64,
    pub redriven_processing: u64,
    /// WAL records whose id the ledger holds with other content (a refused 409).
    pub conflicting: u64,
    /// Oldest `received_at` still unfinished after the pass (None: everything finished).
    pub oldest_unfinished: Option<DateTime<Utc>>,
    /// The pass went through the whole window.
    pub complete: bool,
    /// A rebuild's pass marked the ledger intact (`ReconcileOptions::rebuild_token`).
    pub marked_intact: bool,
    /// What was (or, in a dry run, would be) done.
    pub actions: Vec<String>,
}

impl ReconcileReport {
    /// Ledger entries found wrong or missing.
    pub fn drift(&self) -> u64 {
        self.missing_from_ledger + self.restored_finished + self.corrected_from_journal
    }

    pub fn redriven(&self) -> u64 {
        self.missing_from_ledger
            + self.redriven_pending
            + self.redriven_failed
            + self.redriven_processing
    }
}

#[derive(Debug)]
enum Plan {
    /// Young and missing: ingest may still be registering it.
    Wait,
    Nothing,
    Restore(TxRecord),
    Correct(TxRecord),
    Redrive(&'static str),
}

fn plan(
    current: Option<&TxRecord>,
    reg: &Registration,
    known: Option<&Known>,
    now: DateTime<Utc>,
    o: &ReconcileOptions,
    in_flight: Duration,
) -> Plan {
    let slack = ChronoDuration::from_std(o.slack).unwrap_or_default();
    let pending_after = ChronoDuration::from_std(o.pending_after).unwrap_or_default();
    let finished = known.is_some_and(|k| k.state.is_terminal());
    let Some(cur) = current else {
        if known.is_none() && !o.rebuild && now - reg.received_at <= pending_after {
            return Plan::Wait;
        }
        return Plan::Restore(restored_record(reg, known, now, in_flight));
    };
    // A journaled outcome about other bytes (`sha256` recorded, not the
    // ledger's) is not this record's: correcting from it would mark
    // unexecuted bytes done. Left to the normal handling below.
    if !cur.status.is_terminal()
        && finished
        && let Some(k) = known
        && k.sha256.as_ref().is_none_or(|s| *s == cur.sha256)
    {
        let mut rec = restored_record(reg, Some(k), now, in_flight);
        rec.wal_ref = cur.wal_ref.clone();
        rec.created_at = cur.created_at;
        rec.vendor = cur.vendor.clone();
        rec.replay_nonce = cur.replay_nonce.clone();
        rec.attempts = rec.attempts.max(cur.attempts);
        rec.retry_count = rec.retry_count.max(cur.retry_count);
        rec.attempt_base = rec.attempt_base.max(cur.attempt_base);
        rec.expires_at = cur.expires_at.or(rec.expires_at);
        rec.updated_at = now;
        return Plan::Correct(rec);
    }
    match cur.status {
        // A replayed `pending` may wait for a time of its own (after its last
        // failed attempt's call can have ended): its copy is scheduled for
        // then, and one sent before would only be rescheduled, pass after
        // pass, one more copy each time (a review of the seed 804 fix).
        State::Pending
            if o.redrive_pending
                && now - cur.updated_at > pending_after
                && cur.next_retry_at.is_none_or(|t| t + slack < now) =>
        {
            Plan::Redrive("pending")
        }
        State::Failed if cur.next_retry_at.is_none_or(|t| t + slack < now) => {
            Plan::Redrive("failed")
        }
        State::Processing if cur.lease_until.is_none_or(|t| t + slack < now) => {
            Plan::Redrive("processing")
        }
        _ => Plan::Nothing,
    }
}

/// Keeps the lease while a pass runs.
struct LeaseKeeper<'a> {
    ledger: &'a dyn Ledger,
    opts: Option<&'a LeaseOptions>,
    renewed: Instant,
    /// Renewals wait out an unavailable ledger ([`ReconcileOptions::patient_ledger`]).
    patient: bool,
}

impl LeaseKeeper<'_> {
    async fn acquire(&mut self) -> Result<(), ReconcileError> {
        if let Some(l) = self.opts {
            if !self.ledger.try_lease(LEASE, &l.owner, l.ttl).await? {
                return Err(ReconcileError::LeaseHeld);
            }
            self.renewed = Instant::now();
        }
        Ok(())
    }

    async fn keep(&mut self) -> Result<(), ReconcileError> {
        match self.opts {
            Some(l) if self.renewed.elapsed() > l.ttl / 3 => {
                let mut p = Patience::new();
                loop {
                    match self.acquire().await {
                        Err(e) if self.patient && p.again("lease", &e).await => {}
                        r => return r,
                    }
                }
            }
            _ => Ok(()),
        }
    }
}

impl ReconcileOptions {
    /// Whether the pass's ledger calls wait out an unavailable ledger. Not
    /// in a rebuild: a Redis that restarts (or fails over) mid-rebuild may
    /// come back without the restores written so far but with the rebuild
    /// token, and a pass that carried on would mark a ledger with holes;
    /// the pass ends, and the next one starts over with a new token.
    fn patient_ledger(&self) -> bool {
        self.rebuild_token.is_none()
    }
}

/// A ledger call of a pass, tried again while the ledger is unavailable
/// unless the pass is a rebuild ([`ReconcileOptions::patient_ledger`]).
async fn ledger_call<T, Fut: std::future::Future<Output = Result<T, LedgerError>>>(
    o: &ReconcileOptions,
    what: &'static str,
    mut f: impl FnMut() -> Fut,
) -> Result<T, LedgerError> {
    if o.patient_ledger() {
        patiently(what, f).await
    } else {
        f().await
    }
}

impl Transient for ReconcileError {
    fn transient(&self) -> bool {
        match self {
            ReconcileError::Wal(e) => e.transient(),
            ReconcileError::Ledger(e) => e.transient(),
            ReconcileError::LeaseHeld => false,
        }
    }
}

impl Reconciler {
    /// One pass over `[o.from, o.to]`. The lease is held only while the pass
    /// runs, so an operator's `rtpd reconcile` gets its turn between background
    /// passes.
    pub async fn reconcile(&self, o: &ReconcileOptions) -> Result<ReconcileReport, ReconcileError> {
        let mut lease = LeaseKeeper {
            ledger: self.ledger.as_ref(),
            opts: o.lease.as_ref(),
            renewed: Instant::now(),
            patient: o.patient_ledger(),
        };
        lease.acquire().await?;
        // Only a lease holder records its token: a rebuild waiting for the
        // lease must not overwrite the token of the one running.
        if let Some(token) = &o.rebuild_token
            && !o.dry_run
        {
            if let Err(e) = ledger_call(o, "ledger begin_rebuild", || {
                self.ledger.begin_rebuild(token)
            })
            .await
            {
                self.release(o).await;
                return Err(e.into());
            }
            tracing::warn!(
                ledger = %self.ledger.describe(),
                from = %o.from,
                to = %o.to,
                "rebuilding the ledger from the WAL and the journal: it has no intact mark (it lost its data, or it is new, or it was written by a version without the mark), or an operator rebuilds it; new transactions get a 503 until it is marked"
            );
        }
        // The name is `telemetry::ports::RECONCILE_PASS`: the pass's ledger
        // calls do not name each transaction they check as `transaction_id`.
        let span = tracing::info_span!(
            "reconcile",
            from = %o.from,
            to = %o.to,
            drift = tracing::field::Empty,
            redriven = tracing::field::Empty,
        );
        let mut result = self.pass(o, &mut lease).instrument(span.clone()).await;
        if let Ok(r) = &mut result {
            span.record("drift", r.drift());
            span.record("redriven", r.redriven());
            if let Some(token) = &o.rebuild_token
                && !o.dry_run
                && r.complete
            {
                match ledger_call(o, "ledger mark_intact", || self.ledger.mark_intact(token)).await
                {
                    Ok(marked) => r.marked_intact = marked,
                    Err(e) => {
                        self.release(o).await;
                        return Err(e.into());
                    }
                }
            }
        }
        self.release(o).await;
        result
    }

    async fn release(&self, o: &ReconcileOptions) {
        if let Some(l) = &o.lease {
            // A zero-length renewal ends the lease at once.
            let _ = self.ledger.try_lease(LEASE, &l.owner, Duration::ZERO).await;
        }
    }

    /// A ledger rebuild from the WAL and the journal over `[o.from, o.to]`
    /// (a reconcile pass, waiting up to `patience` for the lease), then the
    /// ledger's intact mark ([`Ledger::intact`]) when the pass was complete
    /// and nothing lost the ledger again meanwhile: the mark is written only
    /// if the token recorded before the pass is still there. The report, and
    /// whether the ledger is marked intact now (never on a dry run).
    pub async fn rebuild(
        &self,
        o: &ReconcileOptions,
        patience: Duration,
    ) -> Result<(ReconcileReport, bool), ReconcileError> {
        let mut o = o.clone();
        o.rebuild = true;
        o.rebuild_token = Some(uuid::Uuid::new_v4().to_string());
        let report = self.reconcile_when_free(&o, patience).await?;
        let marked = report.marked_intact;
        Ok((report, marked))
    }

    /// When the ledger has no intact mark — it lost its data (a Redis
    /// flushed or restarted empty), or it is new — rebuilds it from the WAL
    /// and the journal over the last `lookback` (re-driving nothing: the
    /// processor and the reconciler do that from the rebuilt records) and
    /// marks it. Until then ingest answers 503 (issue 12, N1). `None` when
    /// the ledger was intact; else whether it is marked now (false: another
    /// pass held the lease, or the ledger was lost again; try again).
    pub async fn rebuild_if_lost(
        &self,
        lookback: Duration,
    ) -> Result<Option<bool>, ReconcileError> {
        if self.ledger.intact().await? {
            return Ok(None);
        }
        let started = Instant::now();
        // Every record acknowledged before the loss was written before now
        // (by its instance's clock, which may run a little ahead); what
        // intake writes from now on it refuses (and notes).
        let now = crate::clock::now();
        let from = now - ChronoDuration::from_std(lookback).unwrap_or_default();
        let to = now + ChronoDuration::from_std(REBUILD_CLOCK_MARGIN).unwrap_or_default();
        let mut o = ReconcileOptions::new(from, to, self.in_flight);
        o.redrive = false;
        // An owner of its own: the watcher, the periodic loop and start-up of
        // one process must not share (and release) one another's lease.
        o.lease = Some(LeaseOptions {
            owner: format!(
                "rebuild-{}-{}",
                self.instance,
                uuid::Uuid::new_v4().simple()
            ),
            ttl: Duration::from_secs(60),
        });
        let (report, marked) = match self.rebuild(&o, Duration::ZERO).await {
            Err(ReconcileError::LeaseHeld) => {
                tracing::debug!(
                    "ledger without its intact mark: another instance is rebuilding it"
                );
                return Ok(Some(false));
            }
            other => other?,
        };
        crate::metrics::ledger_rebuilt(marked);
        if marked {
            tracing::warn!(
                records = report.records,
                restored = report.missing_from_ledger,
                secs = started.elapsed().as_secs_f64(),
                "ledger rebuilt from the WAL and marked intact; ingest accepts again"
            );
        } else {
            tracing::warn!(
                complete = report.complete,
                "ledger rebuild not finished (or the ledger was lost again); tried again"
            );
        }
        Ok(Some(marked))
    }

    /// Like [`reconcile`], waiting up to `patience` for the lease.
    pub async fn reconcile_when_free(
        &self,
        o: &ReconcileOptions,
        patience: Duration,
    ) -> Result<ReconcileReport, ReconcileError> {
        let deadline = Instant::now() + patience;
        loop {
            match self.reconcile(o).await {
                Err(ReconcileError::LeaseHeld) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                other => return other,
            }
        }
    }

    async fn pass(
        &self,
        o: &ReconcileOptions,
        lease: &mut LeaseKeeper<'_>,
    ) -> Result<ReconcileReport, ReconcileError> {
        let mut report = ReconcileReport::default();
        let mut seen = HashSet::new();
        // Ids the ledger does not hold, with every WAL record of theirs in
        // the window: which one stands for the transaction is decided once
        // all are known (issue 12 item 2).
        let mut missing: BTreeMap<TransactionId, Vec<Candidate>> = BTreeMap::new();
        let pace =
            (o.rate_per_sec > 0).then(|| Duration::from_secs_f64(1.0 / o.rate_per_sec as f64));

        // Outcomes of transactions received in the window are journaled after it starts.
        let mut journal = JournalIndex::default();
        self.refresh_journal(o, &mut journal, o.from, &mut report)
            .await?;

        let segments = patiently("wal list", || self.wal.segments(o.from, o.to)).await?;
        if let Some(p) = &o.progress {
            p.set_length(segments.len() as u64);
        }
        // Read ahead (crate::wal::READ_AHEAD segments at once), each read
        // tried again while the store is unavailable.
        let mut reads = futures::StreamExt::buffered(
            futures::StreamExt::map(futures::stream::iter(segments), |seg| async move {
                self.wal.read_segment_or_skip(&seg.key).await
            }),
            crate::wal::READ_AHEAD,
        );
        while let Some(read) = futures::StreamExt::next(&mut reads).await {
            let Some(records) = read? else {
                report.unreadable_segments += 1;
                continue;
            };
            report.segments += 1;
            if let Some(p) = &o.progress {
                p.inc(1);
            }
            lease.keep().await?;
            for (wal_ref, bytes) in records {
                report.records += 1;
                // A record whose id is already a key (`<vendor>/<id>`) names
                // no transaction: unreadable, never another vendor's.
                let (wal, key) = match serde_json::from_slice::<WalRecord>(&bytes)
                    .map_err(|e| e.to_string())
                    .and_then(|w| w.key().map(|k| (w, k)).map_err(|e| e.to_string()))
                {
                    Ok(w) => w,
                    Err(e) => {
                        report.unreadable += 1;
                        tracing::error!(wal_ref = %wal_ref, error = %e, "unreadable WAL record");
                        continue;
                    }
                };
                if wal.received_at < o.from || wal.received_at > o.to || seen.contains(&key) {
                    continue;
                }
                // The vendor-scoped key, or the key of an entry written
                // before keys were scoped (then that key is used throughout).
                let Some(current) = self.find(o, &key).await? else {
                    missing.entry(key.clone()).or_default().push(Candidate {
                        wal_ref,
                        sha256: wal.sha256.clone(),
                        received_at: wal.received_at,
                    });
                    continue;
                };
                if current.sha256 != wal.sha256 {
                    // A record the ledger did not accept (a refused re-POST, the
                    // loser of two first POSTs). The id is not done with: the
                    // record the ledger holds may come later in the WAL.
                    report.conflicting += 1;
                    continue;
                }
                seen.insert(key);
                // A pre-scoping entry is met under its bare key in the ledger walk.
                seen.insert(current.transaction_id.clone());
                let (id, wal_ref) = (current.transaction_id.clone(), current.wal_ref.clone());
                if !self
                    .act(
                        o,
                        &mut report,
                        &mut journal,
                        id,
                        &wal_ref,
                        wal,
                        Some(current),
                        pace,
                    )
                    .await?
                {
                    record_metrics(&report, o);
                    return Ok(report);
                }
            }
        }
        // An id with several WAL records is restored from the latest one
        // intake did not refuse; a refusal is journaled after its WAL append
        // (issue 12, N1: a 503 while the ledger is lost), so give the notes
        // of the latest such records time to land, then read them.
        // In a rebuild every missing id counts: a lone record too may be one
        // intake is about to refuse (its registration still on the way).
        let latest_contested = missing
            .iter()
            .filter(|(k, c)| (o.rebuild || c.len() > 1) && !seen.contains(*k))
            .flat_map(|(_, c)| c.iter().map(|c| c.received_at))
            .max();
        if let Some(latest) = latest_contested {
            let settle = latest + ChronoDuration::from_std(REFUSAL_SETTLE).unwrap_or_default();
            // Bounded: a record from a clock running far ahead must not hold
            // the pass (and the lease) for long.
            if let Ok(wait) = (settle - crate::clock::now()).to_std() {
                let wait = wait.min(REFUSAL_SETTLE + 2 * REBUILD_CLOCK_MARGIN);
                lease.keep().await?;
                crate::clock::sleep(wait).await;
                lease.keep().await?;
            }
        }
        // Every id left in `missing` was missing from the ledger when the
        // walk looked; an outcome the ledger held before it lost it was
        // journaled before it was settled, so a journal read from now on
        // holds it — the one from the start of the pass may predate it
        // (simulation seed 982: a success journaled 0.1 s after the pass's
        // first read, the ledger lost, the transaction restored as
        // unfinished and called again).
        if missing.keys().any(|k| !seen.contains(k)) {
            self.refresh_journal(o, &mut journal, o.from, &mut report)
                .await?;
        }
        for (key, candidates) in missing {
            if seen.contains(&key) {
                continue; // a later record of it was in the ledger after all
            }
            lease.keep().await?;
            let Some((wal_ref, wal)) = self
                .choose(&key, &candidates, &journal, o, &mut report)
                .await?
            else {
                continue;
            };
            // Ingest or a processor may have put it back meanwhile.
            let current = self.find(o, &key).await?;
            let (id, wal_ref) = match &current {
                Some(c) if c.sha256 != wal.sha256 => {
                    report.conflicting += 1;
                    continue;
                }
                Some(c) => (c.transaction_id.clone(), c.wal_ref.clone()),
                None => (key.clone(), wal_ref),
            };
            seen.insert(key);
            seen.insert(id.clone());
            if !self
                .act(
                    o,
                    &mut report,
                    &mut journal,
                    id,
                    &wal_ref,
                    wal,
                    current,
                    pace,
                )
                .await?
            {
                record_metrics(&report, o);
                return Ok(report);
            }
        }
        if o.redrive
            && !self
                .redrive_unfinished_outside_window(o, &seen, &journal, &mut report)
                .await?
        {
            record_metrics(&report, o);
            return Ok(report);
        }
        // A pass that skipped segments the store would not return did not
        // see everything: it marks nothing and moves no watermark past them,
        // unless an operator accepted that.
        report.complete = report.unreadable_segments == 0 || o.accept_unreadable;
        record_metrics(&report, o);
        Ok(report)
    }

    /// The ledger's record of `key` (scoped or from before scoping), tried
    /// again while the ledger is unavailable.
    async fn find(
        &self,
        o: &ReconcileOptions,
        key: &TransactionId,
    ) -> Result<Option<TxRecord>, LedgerError> {
        ledger_call(o, "ledger get", || crate::ledger::find(&*self.ledger, key)).await
    }

    /// `journal` brought up to now from `from`, tried again while the
    /// journal's store is unavailable (a retry reads only what is unseen).
    /// A journal segment the store will not return fails the pass before it
    /// writes anything, unless an operator accepted unreadable segments: a
    /// pass that acted on a journal with a hole would restore a finished
    /// transaction as unfinished and re-drive it, or restore bytes whose
    /// refusal the hole held. (A WAL segment's hole only leaves its own
    /// records out, and the pass is then not complete.)
    async fn refresh_journal(
        &self,
        o: &ReconcileOptions,
        journal: &mut JournalIndex,
        from: DateTime<Utc>,
        report: &mut ReconcileReport,
    ) -> Result<(), WalError> {
        let skipped = journal.unreadable_segments;
        let r = journal
            .refresh(
                &self.journal,
                from,
                crate::clock::now(),
                o.accept_unreadable,
            )
            .await;
        report.unreadable_segments += journal.unreadable_segments - skipped;
        match r {
            Err(WalError::Unavailable(e)) if self.journal.log().ping().await.is_ok() => {
                Err(WalError::Unavailable(format!(
                    "{e} (the store answers otherwise; if that journal segment is gone for good, `rtpd rebuild-ledger --accept-unreadable-segments` accepts losing what it held)"
                )))
            }
            r => r,
        }
    }

    /// Which of the WAL records of `key` (an id the ledger lost) stands for
    /// the transaction (issue 12 item 2, rebuild half): the one whose sha256
    /// the journal names (an attempt or a replay of it), else the latest one
    /// intake did not refuse (a 409 is journaled before it is answered; the
    /// others were acknowledged or answered "maybe accepted" — 5xx or no
    /// answer — and a vendor re-POSTs after a 5xx, so the latest is its last
    /// word). `None` when every record was refused: nothing a vendor was
    /// refused is restored, so nothing of it runs without an operator.
    async fn choose(
        &self,
        key: &TransactionId,
        candidates: &[Candidate],
        journal: &JournalIndex,
        o: &ReconcileOptions,
        report: &mut ReconcileReport,
    ) -> Result<Option<(WalRef, WalRecord)>, ReconcileError> {
        let o_dry_run = o.dry_run;
        let known = known_for(journal, key);
        // Asked after the settle wait (every pass, rebuild or not): a
        // registration refused for want of the intact mark is remembered by
        // the ledger in the same step as the refusal.
        let refs: Vec<String> = candidates.iter().map(|c| c.wal_ref.to_string()).collect();
        let lost_refused: HashSet<String> = ledger_call(o, "ledger refused_while_lost", || {
            self.ledger.refused_while_lost(key.as_str(), &refs)
        })
        .await?
        .into_iter()
        .collect();
        let mut refused = journal.refused(key);
        if let Some(bare) = key.unscoped() {
            refused.extend(journal.refused(&bare));
        }
        // Journaled refusals, and those the ledger itself remembers from
        // while it had no intact mark (even if their journal note is missing).
        let is_refused = |c: &Candidate| {
            JournalIndex::is_refused(&refused, &c.sha256, &c.wal_ref)
                || lost_refused.contains(&c.wal_ref.to_string())
        };
        let named = known
            .as_ref()
            .and_then(|k| k.sha256.as_ref())
            .and_then(|sha| {
                candidates
                    .iter()
                    .rev()
                    .find(|c| c.sha256 == *sha && !is_refused(c))
            });
        let chosen = named.or_else(|| {
            candidates
                .iter()
                .filter(|c| !is_refused(c))
                .max_by_key(|c| c.received_at)
        });
        let others = candidates
            .iter()
            .filter(|c| chosen.is_none_or(|x| x.sha256 != c.sha256))
            .count();
        report.conflicting += others as u64;
        // Refusals only the ledger remembers (their journal note failed, or
        // the process died before it) are journaled now: a later loss takes
        // the ledger's memory with it, the journal stays.
        if !o_dry_run {
            for c in candidates.iter().filter(|c| {
                lost_refused.contains(&c.wal_ref.to_string())
                    && !JournalIndex::is_refused(&refused, &c.sha256, &c.wal_ref)
            }) {
                let entry = crate::journal::JournalEntry {
                    v: 1,
                    kind: crate::journal::EntryKind::Refused,
                    transaction_id: key.to_string(),
                    at: crate::clock::now(),
                    attempt: None,
                    state: State::Pending,
                    error: None,
                    next_retry_at: None,
                    actor: format!("rebuild-{}", self.instance),
                    reason: Some(format!(
                        "503 while the ledger was lost (remembered by the ledger); WAL record {} refused",
                        c.wal_ref
                    )),
                    sha256: Some(c.sha256.clone()),
                    wal_ref: Some(c.wal_ref.to_string()),
                    replay_nonce: None,
                    latency_ms: None,
                };
                self.journal.append(&entry).await?;
            }
        }
        let Some(chosen) = chosen else {
            tracing::warn!(transaction_id = %key, records = candidates.len(), "every WAL record of this id was refused; nothing restored");
            report.actions.push(format!(
                "{key}: every WAL record was refused (409); not restored"
            ));
            return Ok(None);
        };
        if others > 0 {
            tracing::warn!(transaction_id = %key, chosen = %chosen.wal_ref, sha256 = %chosen.sha256, journaled = named.is_some(), others, "several WAL records with other content for one id; restoring the confirmed or latest unrefused one");
        }
        let wal = match patiently("wal read", || self.wal.read(&chosen.wal_ref))
            .await
            .map(|b| serde_json::from_slice::<WalRecord>(&b))
        {
            Ok(Ok(w)) if w.sha256 == chosen.sha256 => w,
            Ok(_) => {
                report.unreadable += 1;
                tracing::error!(transaction_id = %key, wal_ref = %chosen.wal_ref, "WAL record no longer reads as it did");
                return Ok(None);
            }
            Err(e) => return Err(e.into()),
        };
        Ok(Some((chosen.wal_ref.clone(), wal)))
    }

    /// Plans and carries out what one transaction needs. False when a send
    /// failed (the pass stops there).
    #[allow(clippy::too_many_arguments)]
    async fn act(
        &self,
        o: &ReconcileOptions,
        report: &mut ReconcileReport,
        journal: &mut JournalIndex,
        id: TransactionId,
        wal_ref: &WalRef,
        wal: WalRecord,
        current: Option<TxRecord>,
        pace: Option<Duration>,
    ) -> Result<bool, ReconcileError> {
        let reg = wal.registration_as(id.clone(), wal_ref);
        let known = known_for(journal, &id);
        let now = crate::clock::now();
        let p = plan(
            current.as_ref(),
            &reg,
            known.as_ref(),
            now,
            o,
            self.in_flight,
        );
        let unfinished = match &p {
            Plan::Restore(r) | Plan::Correct(r) => !r.status.is_terminal(),
            Plan::Nothing => current.as_ref().is_some_and(|c| !c.status.is_terminal()),
            Plan::Wait | Plan::Redrive(_) => true,
        };
        if unfinished {
            report.oldest_unfinished = Some(
                report
                    .oldest_unfinished
                    .map_or(wal.received_at, |t| t.min(wal.received_at)),
            );
        }
        let (why, redrive, scheduled) = match p {
            Plan::Wait | Plan::Nothing => return Ok(true),
            Plan::Restore(rec) => {
                let finished = rec.status.is_terminal();
                if finished {
                    report.restored_finished += 1;
                } else {
                    report.missing_from_ledger += 1;
                }
                let scheduled = rec.next_retry_at.filter(|t| *t > now);
                if !o.dry_run
                    && !ledger_call(o, "ledger restore", || {
                        self.ledger.restore_missing(rec.clone())
                    })
                    .await?
                {
                    // Someone (a processor) restored it meanwhile; it is in hand.
                    return Ok(true);
                }
                if finished {
                    ("missing from ledger; journal says finished", false, None)
                } else {
                    ("missing from ledger", o.redrive, scheduled)
                }
            }
            Plan::Correct(_) => {
                // Issue 12 item 8: the journal index was read when the pass
                // began, and the ledger a moment ago; an operator replay (or
                // a processor) may have moved the transaction on since. Read
                // both again, and put the correction only over the version
                // just read.
                self.refresh_journal(o, journal, o.from, report).await?;
                let Some(cur) = self.find(o, &id).await? else {
                    return Ok(true);
                };
                let known = known_for(journal, &id);
                let Plan::Correct(rec) =
                    plan(Some(&cur), &reg, known.as_ref(), now, o, self.in_flight)
                else {
                    tracing::info!(transaction_id = %id, "moved on during the pass; no correction");
                    return Ok(true);
                };
                report.corrected_from_journal += 1;
                if !o.dry_run
                    && !ledger_call(o, "ledger restore", || {
                        self.ledger.restore_if_unchanged(&cur, rec.clone())
                    })
                    .await?
                {
                    tracing::info!(transaction_id = %id, "changed while being corrected; left to the next pass");
                    return Ok(true);
                }
                ("ledger behind the journal; corrected", false, None)
            }
            Plan::Redrive(state) if o.redrive => {
                match state {
                    "pending" => report.redriven_pending += 1,
                    "failed" => report.redriven_failed += 1,
                    _ => report.redriven_processing += 1,
                }
                (state, true, None)
            }
            Plan::Redrive(_) => return Ok(true),
        };
        let status = if redrive { " (re-drive)" } else { "" };
        report.actions.push(format!("{id}: {why}{status}"));
        if o.dry_run || !redrive {
            return Ok(true);
        }
        let (span, msg) = redrive_message(&id, why, reg, wal, scheduled);
        let sent = self.queue.send(vec![msg]).instrument(span.clone()).await;
        let _in_redrive = span.enter();
        if let Err(e) = sent {
            tracing::warn!(transaction_id = %id, error = %e, "re-enqueue failed; stopping this pass");
            return Ok(false);
        }
        tracing::info!(transaction_id = %id, reason = why, "re-driven from the WAL");
        drop(_in_redrive);
        if let Some(p) = pace {
            tokio::time::sleep(p).await;
        }
        Ok(true)
    }
}

/// A re-drive's span and message. A re-drive is an operation of its own,
/// as an operator replay is: linked to the payment's trace (the WAL
/// record's) and to the pass, not a child of the pass (whose trace would
/// otherwise hold every payment it re-drives). The message carries this
/// span's context, so the processor's attempt continues it.
fn redrive_message(
    id: &TransactionId,
    why: &'static str,
    reg: Registration,
    wal: WalRecord,
    scheduled: Option<DateTime<Utc>>,
) -> (tracing::Span, crate::queue::OutgoingMessage) {
    let span = tracing::info_span!(
        parent: None,
        "redrive",
        transaction_id = TransactionId::vendor_part(id.as_str()),
        transaction_key = %id,
        reason = why,
    );
    crate::trace_context::link_to(&span, wal.trace_parent.as_deref());
    crate::trace_context::link_spans(&span, &tracing::Span::current());
    let msg = span.in_scope(|| {
        Envelope::new(
            reg,
            Bytes::from(wal.payload.into_bytes()),
            Delivery::Redrive(Delivery::nonce()),
        )
        .scheduled_at(scheduled)
        .to_message()
    });
    (span, msg)
}

/// One WAL record of an id the ledger lost.
#[derive(Debug)]
struct Candidate {
    wal_ref: WalRef,
    sha256: Sha256,
    received_at: DateTime<Utc>,
}

/// What the journal says about `id`; outcomes journaled before keys were
/// scoped are under the bare id.
fn known_for(journal: &JournalIndex, id: &TransactionId) -> Option<Known> {
    journal
        .known(id)
        .or_else(|| id.unscoped().and_then(|bare| journal.known(&bare)))
}

impl Reconciler {
    /// Issue 12 item 3: walks the ledger's non-terminal states (pending,
    /// failed, processing) for transactions the WAL window did not cover (a
    /// replayed old transaction, anything older than the watermark) and
    /// re-drives the overdue ones from their WAL record, whatever their age.
    /// False when a send failed (the pass stops there).
    async fn redrive_unfinished_outside_window(
        &self,
        o: &ReconcileOptions,
        seen: &HashSet<crate::transaction::TransactionId>,
        journal: &JournalIndex,
        report: &mut ReconcileReport,
    ) -> Result<bool, ReconcileError> {
        for state in [State::Pending, State::Failed, State::Processing] {
            let mut cursor = None;
            loop {
                let page = ledger_call(o, "ledger list", || {
                    self.ledger.list(crate::ledger::ListQuery {
                        state: Some(state),
                        limit: 500,
                        cursor: cursor.clone(),
                    })
                })
                .await?;
                for cur in page.items {
                    if seen.contains(&cur.transaction_id) {
                        continue;
                    }
                    let now = crate::clock::now();
                    let reg = cur.registration();
                    let known = known_for(journal, &cur.transaction_id);
                    let Plan::Redrive(why) =
                        plan(Some(&cur), &reg, known.as_ref(), now, o, self.in_flight)
                    else {
                        continue;
                    };
                    let wal: WalRecord = match patiently("wal read", || self.wal.read(&cur.wal_ref))
                        .await
                        .map(|b| serde_json::from_slice::<WalRecord>(&b))
                    {
                        Ok(Ok(w))
                            if w.payload_sha256_matches()
                                && w.sha256 == cur.sha256
                                && w.key().is_ok() =>
                        {
                            w
                        }
                        Ok(_) => {
                            report.unreadable += 1;
                            tracing::error!(transaction_id = %cur.transaction_id, wal_ref = %cur.wal_ref, "WAL record unreadable or not the ledger's");
                            continue;
                        }
                        Err(e) => return Err(e.into()),
                    };
                    match why {
                        "pending" => report.redriven_pending += 1,
                        "failed" => report.redriven_failed += 1,
                        _ => report.redriven_processing += 1,
                    }
                    report.actions.push(format!(
                        "{}: {why}, outside the WAL window (re-drive)",
                        cur.transaction_id
                    ));
                    if o.dry_run {
                        continue;
                    }
                    // Under the ledger's key: an entry written before keys
                    // were scoped keeps its bare key (the WAL record's is scoped).
                    let reg = wal.registration_as(cur.transaction_id.clone(), &cur.wal_ref);
                    let (span, msg) = redrive_message(&cur.transaction_id, why, reg, wal, None);
                    let sent = self.queue.send(vec![msg]).instrument(span.clone()).await;
                    let _in_redrive = span.enter();
                    if let Err(e) = sent {
                        tracing::warn!(transaction_id = %cur.transaction_id, error = %e, "re-enqueue failed; stopping this pass");
                        return Ok(false);
                    }
                    tracing::info!(transaction_id = %cur.transaction_id, reason = why, "re-driven from the WAL (outside the window)");
                }
                match page.next_cursor {
                    Some(c) => cursor = Some(c),
                    None => break,
                }
            }
        }
        Ok(true)
    }
}

fn record_metrics(r: &ReconcileReport, o: &ReconcileOptions) {
    if o.dry_run {
        return;
    }
    metrics::reconciler("drift_found", r.drift());
    metrics::reconciler("missing_from_ledger", r.missing_from_ledger);
    metrics::reconciler("restored_finished", r.restored_finished);
    metrics::reconciler("corrected_from_journal", r.corrected_from_journal);
    metrics::reconciler("redriven_pending", r.redriven_pending);
    metrics::reconciler("redriven_failed", r.redriven_failed);
    metrics::reconciler("redriven_processing", r.redriven_processing);
    metrics::reconciler("unreadable_segments", r.unreadable_segments);
    if o.redrive {
        metrics::reconciler("redriven", r.redriven());
    }
}

/// Where the next periodic pass may start after `r`: the oldest unfinished
/// record, but never closer to the present than `margin` (a record received
/// just before the pass may land in a segment flushed just after its listing).
pub fn next_watermark(r: &ReconcileReport, to: DateTime<Utc>, margin: Duration) -> DateTime<Utc> {
    let margin_floor = to - ChronoDuration::from_std(margin).unwrap_or_default();
    r.oldest_unfinished
        .map_or(margin_floor, |t| t.min(margin_floor))
}

/// Settings of the background reconciler.
#[derive(Debug, Clone)]
pub struct Periodic {
    pub interval: Duration,
    /// Window when no watermark is known (a fresh or rebuilt ledger).
    pub lookback: Duration,
    pub pending_after: Duration,
    pub rate_per_sec: u32,
}

/// The last background pass this process made, as the operations console
/// shows it (reconciler drift). In memory only: it costs the pass no I/O.
#[derive(Debug, Clone, Serialize)]
pub struct LastPass {
    pub at: DateTime<Utc>,
    /// The window the pass covered.
    pub from: DateTime<Utc>,
    /// `Ok`: the pass's report; `Err`: why it failed.
    pub result: Result<ReconcileReport, String>,
}

/// Actions of a pass kept in [`LastPass`].
pub const LAST_PASS_ACTIONS: usize = 20;

/// Where [`run_periodically_publishing`] publishes each pass.
pub type LastPassCell = Arc<std::sync::Mutex<Option<LastPass>>>;

/// Runs a pass every `interval` while this instance holds the lease, starting
/// at the shared low watermark, until `shutdown`.
pub async fn run_periodically(
    svc: Arc<Reconciler>,
    p: Periodic,
    shutdown: tokio::sync::watch::Receiver<bool>,
) {
    run_periodically_publishing(svc, p, shutdown, LastPassCell::default()).await
}

/// [`run_periodically`], publishing each pass this instance made (not a
/// pass skipped because another instance held the lease) in `published`.
pub async fn run_periodically_publishing(
    svc: Arc<Reconciler>,
    p: Periodic,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
    published: LastPassCell,
) {
    let publish = |from: DateTime<Utc>, result: Result<ReconcileReport, String>| {
        let pass = LastPass {
            at: crate::clock::now(),
            from,
            result,
        };
        *published.lock().unwrap_or_else(|e| e.into_inner()) = Some(pass);
    };
    let lease = LeaseOptions {
        owner: svc.instance.clone(),
        // Held only during a pass; after a crash mid-pass the next holder waits this long.
        ttl: (p.interval * 3).max(Duration::from_secs(30)),
    };
    loop {
        // A lost ledger is rebuilt (and marked) before anything else; while
        // another instance rebuilds it, no regular pass competes for the lease.
        match svc.rebuild_if_lost(p.lookback).await {
            Ok(None | Some(true)) => {}
            Ok(Some(false)) => {
                tokio::select! {
                    _ = tokio::time::sleep(p.interval) => {}
                    _ = shutdown.wait_for(|s| *s) => return,
                }
                continue;
            }
            Err(e) => {
                // No regular pass over a ledger that is not rebuilt yet.
                tracing::warn!(error = %e, "ledger rebuild failed; tried again");
                tokio::select! {
                    _ = tokio::time::sleep(p.interval) => {}
                    _ = shutdown.wait_for(|s| *s) => return,
                }
                continue;
            }
        }
        let now = crate::clock::now();
        let fallback = now - ChronoDuration::from_std(p.lookback).unwrap_or_default();
        let from = match svc.ledger.checkpoint(WATERMARK).await {
            Ok(Some(t)) => DateTime::parse_from_rfc3339(&t)
                .map(|t| t.with_timezone(&Utc))
                .unwrap_or(fallback),
            Ok(None) => fallback,
            Err(e) => {
                tracing::warn!(error = %e, "reconciler could not read its watermark");
                fallback
            }
        };
        let mut o = ReconcileOptions::new(from, now, p.pending_after);
        o.rate_per_sec = p.rate_per_sec;
        o.lease = Some(lease.clone());
        let pass = svc.reconcile(&o).await;
        match &pass {
            Ok(r) => {
                // A few actions say what it did; a rebuild's thousands would be kept for nothing.
                let mut shown = r.clone();
                shown.actions.truncate(LAST_PASS_ACTIONS);
                publish(from, Ok(shown))
            }
            Err(ReconcileError::LeaseHeld) => {}
            Err(e) => publish(from, Err(e.to_string())),
        }
        match pass {
            Ok(r) => {
                if r.drift() + r.redriven() > 0 {
                    tracing::warn!(
                        drift = r.drift(),
                        redriven = r.redriven(),
                        missing = r.missing_from_ledger,
                        restored_finished = r.restored_finished,
                        corrected = r.corrected_from_journal,
                        pending = r.redriven_pending,
                        failed = r.redriven_failed,
                        processing = r.redriven_processing,
                        "reconciler repaired drift / re-drove overdue transactions"
                    );
                } else {
                    tracing::debug!(records = r.records, %from, "reconciler found nothing to do");
                }
                if r.complete {
                    let wm = next_watermark(&r, now, p.pending_after.max(p.interval));
                    if let Err(e) = svc.ledger.set_checkpoint(WATERMARK, &wm.to_rfc3339()).await {
                        tracing::warn!(error = %e, "reconciler could not store its watermark");
                    }
                }
            }
            Err(ReconcileError::LeaseHeld) => {
                tracing::debug!("another instance holds the reconciler lease")
            }
            Err(e) => tracing::warn!(error = %e, "reconciler pass failed"),
        }
        tokio::select! {
            _ = tokio::time::sleep(p.interval) => {}
            _ = shutdown.wait_for(|s| *s) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transaction::TransactionId;

    fn reg(age_secs: i64) -> Registration {
        Registration {
            transaction_id: TransactionId::parse("t").unwrap(),
            sha256: "aa".into(),
            wal_ref: "w#0+1".parse().unwrap(),
            vendor: None,
            received_at: crate::clock::now() - ChronoDuration::seconds(age_secs),
            expires_at: None,
        }
    }

    fn known(state: State) -> Known {
        Known {
            state,
            attempts: 2,
            attempt_base: 0,
            retry_count: 1,
            error: None,
            next_retry_at: None,
            last_at: crate::clock::now(),
            sha256: None,
        }
    }

    const IN_FLIGHT: Duration = Duration::from_secs(70);

    /// Issue 12 item 4: unfinished work restored from the WAL and the
    /// journal (the ledger lost it) is not runnable until an attempt a lost
    /// process may still have in flight (one lease: lock + downstream
    /// timeout) has run out, whether the journal knows nothing of it, says
    /// `pending` (a replay) or says `failed` with a retry already due; and
    /// its next attempt number is above every journaled one, with one
    /// counted as possibly run in between.
    #[test]
    fn restored_unfinished_work_waits_out_the_lease() {
        use crate::transaction::machine::{ClaimDecision, decide_claim};
        let now = crate::clock::now();
        let r = reg(600);
        let mut failed_due = known(State::Failed);
        failed_due.next_retry_at = Some(now - ChronoDuration::seconds(30));
        for k in [None, Some(known(State::Pending)), Some(failed_due)] {
            let Plan::Restore(rec) = plan(None, &r, k.as_ref(), now, &opts(), IN_FLIGHT) else {
                panic!("restored")
            };
            let lease_end = now + ChronoDuration::from_std(IN_FLIGHT).unwrap();
            for at in [now, lease_end - ChronoDuration::milliseconds(1)] {
                assert_eq!(
                    decide_claim(&rec, at),
                    ClaimDecision::NotDue,
                    "{k:?}: runnable at {at} (restored {now})"
                );
            }
            // One attempt above the journal's is counted as possibly run
            // (it may be journaled after this read): the next claim is
            // attempt journaled + 2, which reads the journal before calling.
            let journaled = k.as_ref().map_or(0, |k| k.attempts);
            assert_eq!(rec.attempts, journaled + 1, "{k:?}");
            assert_eq!(
                decide_claim(&rec, lease_end + ChronoDuration::milliseconds(1)),
                ClaimDecision::Claim {
                    attempt: journaled + 2
                },
                "{k:?}"
            );
            // The reconciler's own re-drive of it is scheduled, not sent for now.
            assert_eq!(rec.next_retry_at, Some(lease_end), "{k:?}");
        }
    }

    fn opts() -> ReconcileOptions {
        ReconcileOptions::new(
            crate::clock::now(),
            crate::clock::now(),
            Duration::from_secs(10),
        )
    }

    #[test]
    fn missing_and_finished_is_restored_not_redriven() {
        let now = crate::clock::now();
        let r = reg(60);
        match plan(
            None,
            &r,
            Some(&known(State::Success)),
            now,
            &opts(),
            IN_FLIGHT,
        ) {
            Plan::Restore(rec) => {
                assert_eq!(rec.status, State::Success);
                assert_eq!(rec.attempts, 2);
            }
            other => panic!("{other:?}"),
        }
        // Unfinished: back, but not runnable at once (item 4).
        match plan(None, &r, None, now, &opts(), IN_FLIGHT) {
            Plan::Restore(rec) => assert_eq!(rec.status, State::Failed),
            other => panic!("{other:?}"),
        }
        // Young and unknown: ingest may be registering it right now.
        assert!(matches!(
            plan(None, &reg(1), None, now, &opts(), IN_FLIGHT),
            Plan::Wait
        ));
    }

    /// A replayed `pending` that waits for its time (its last attempt's
    /// call may still run) is left to its scheduled copy, not re-sent by
    /// every pass; once that time is past, it is re-driven as any pending.
    #[test]
    fn a_replayed_pending_waiting_for_its_time_is_not_re_sent() {
        let now = crate::clock::now();
        let r = reg(600);
        let mut cur = TxRecord::new(&r, now - ChronoDuration::seconds(600));
        cur.next_retry_at = Some(now + ChronoDuration::seconds(60));
        assert!(matches!(
            plan(Some(&cur), &r, None, now, &opts(), IN_FLIGHT),
            Plan::Nothing
        ));
        cur.next_retry_at = Some(now - ChronoDuration::seconds(60));
        assert!(matches!(
            plan(Some(&cur), &r, None, now, &opts(), IN_FLIGHT),
            Plan::Redrive("pending")
        ));
    }

    #[test]
    fn a_ledger_behind_the_journal_is_corrected() {
        let now = crate::clock::now();
        let r = reg(60);
        let mut cur = TxRecord::new(&r, now - ChronoDuration::seconds(60));
        cur.attempts = 3;
        match plan(
            Some(&cur),
            &r,
            Some(&known(State::Success)),
            now,
            &opts(),
            IN_FLIGHT,
        ) {
            Plan::Correct(rec) => {
                assert_eq!(rec.status, State::Success);
                assert_eq!(rec.attempts, 3);
            }
            other => panic!("{other:?}"),
        }
        // A success journaled for other bytes is not this record's.
        let mut other = known(State::Success);
        other.sha256 = Some("bb".into());
        assert!(
            !matches!(
                plan(Some(&cur), &r, Some(&other), now, &opts(), IN_FLIGHT),
                Plan::Correct(_)
            ),
            "corrected from another payload's success"
        );
        other.sha256 = Some(cur.sha256.clone());
        assert!(matches!(
            plan(Some(&cur), &r, Some(&other), now, &opts(), IN_FLIGHT),
            Plan::Correct(_)
        ));
        // After a replay the journal says pending: a normal re-drive.
        assert!(matches!(
            plan(
                Some(&cur),
                &r,
                Some(&known(State::Pending)),
                now,
                &opts(),
                IN_FLIGHT
            ),
            Plan::Redrive("pending")
        ));
    }

    #[test]
    fn the_watermark_stays_behind_the_present() {
        let to = crate::clock::now();
        let mut r = ReconcileReport::default();
        assert_eq!(
            next_watermark(&r, to, Duration::from_secs(60)),
            to - ChronoDuration::seconds(60)
        );
        r.oldest_unfinished = Some(to - ChronoDuration::seconds(3600));
        assert_eq!(
            next_watermark(&r, to, Duration::from_secs(60)),
            to - ChronoDuration::seconds(3600)
        );
    }
}
