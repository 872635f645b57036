//! The reconciler: joins the WAL with the ledger over a time window and
//! re-drives whatever is overdue, so a lost queue message or a lost ledger
//! entry never loses a transaction.
//!
//! For every transaction in the WAL window:
//! - missing from the ledger → registered and enqueued;
//! - `pending` untouched for longer than `pending_after` → re-enqueued;
//! - `failed` whose retry is overdue by `slack` → re-enqueued;
//! - `processing` whose lease expired more than `slack` ago → re-enqueued.
//!
//! Re-enqueued copies carry a distinct message id (`<id>:redrive:<nonce>`), so
//! Service Bus duplicate detection cannot drop them; the ledger's claim makes
//! a redundant copy harmless.

use crate::app::Services;
use crate::ledger::RegisterOutcome;
use crate::metrics;
use crate::processor::message_for;
use crate::replay::registration_of;
use crate::transaction::{State, TxRecord};
use crate::wal::{WalError, WalRecord};
use bytes::Bytes;
use chrono::{DateTime, Duration as ChronoDuration, Utc};
use serde::Serialize;
use std::{collections::HashSet, time::Duration};

#[derive(Debug, Clone)]
pub struct ReconcileOptions {
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
    pub pending_after: Duration,
    pub slack: Duration,
    pub dry_run: bool,
    /// Re-drives per second at most (0 = unlimited).
    pub rate_per_sec: u32,
}

#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct ReconcileReport {
    pub segments: u64,
    pub records: u64,
    pub unreadable: u64,
    pub missing_from_ledger: u64,
    pub redriven_pending: u64,
    pub redriven_failed: u64,
    pub redriven_processing: u64,
    /// WAL records whose id the ledger holds with other content (a refused 409).
    pub conflicting: u64,
    /// What was (or, in a dry run, would be) re-driven.
    pub actions: Vec<String>,
}

impl ReconcileReport {
    pub fn redriven(&self) -> u64 {
        self.missing_from_ledger
            + self.redriven_pending
            + self.redriven_failed
            + self.redriven_processing
    }
}

enum Action {
    None,
    Register,
    Redrive(&'static str),
}

fn decide(
    rec: Option<&TxRecord>,
    wal: &WalRecord,
    now: DateTime<Utc>,
    o: &ReconcileOptions,
) -> Action {
    let slack = ChronoDuration::from_std(o.slack).unwrap_or_default();
    let Some(rec) = rec else {
        return Action::Register;
    };
    if rec.sha256 != wal.sha256 {
        return Action::None;
    }
    match rec.status {
        State::Pending
            if now - rec.updated_at
                > ChronoDuration::from_std(o.pending_after).unwrap_or_default() =>
        {
            Action::Redrive("pending")
        }
        State::Failed if rec.next_retry_at.is_none_or(|t| t + slack < now) => {
            Action::Redrive("failed")
        }
        State::Processing if rec.lease_until.is_none_or(|t| t + slack < now) => {
            Action::Redrive("processing")
        }
        _ => Action::None,
    }
}

pub async fn reconcile(svc: &Services, o: &ReconcileOptions) -> Result<ReconcileReport, WalError> {
    let mut report = ReconcileReport::default();
    let mut seen = HashSet::new();
    let pace = (o.rate_per_sec > 0).then(|| Duration::from_secs_f64(1.0 / o.rate_per_sec as f64));
    for seg in svc.wal.segments(o.from, o.to).await? {
        report.segments += 1;
        for (wal_ref, bytes) in svc.wal.read_segment(&seg.key).await? {
            report.records += 1;
            let wal: WalRecord = match serde_json::from_slice(&bytes) {
                Ok(w) => w,
                Err(e) => {
                    report.unreadable += 1;
                    tracing::error!(wal_ref = %wal_ref, error = %e, "unreadable WAL record");
                    continue;
                }
            };
            if wal.received_at < o.from
                || wal.received_at > o.to
                || !seen.insert(wal.transaction_id.clone())
            {
                continue;
            }
            let id = wal.transaction_id.clone();
            let current = match svc.ledger.get(&id).await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(transaction_id = %id, error = %e, "ledger lookup failed; stopping this pass");
                    return Ok(report);
                }
            };
            if current.as_ref().is_some_and(|c| c.sha256 != wal.sha256) {
                report.conflicting += 1;
                continue;
            }
            let why = match decide(current.as_ref(), &wal, Utc::now(), o) {
                Action::None => continue,
                Action::Register => {
                    report.missing_from_ledger += 1;
                    "missing from ledger"
                }
                Action::Redrive(state) => {
                    match state {
                        "pending" => report.redriven_pending += 1,
                        "failed" => report.redriven_failed += 1,
                        _ => report.redriven_processing += 1,
                    }
                    state
                }
            };
            report.actions.push(format!("{id}: {why}"));
            if o.dry_run {
                continue;
            }
            let wal_ref_s = current
                .as_ref()
                .map(|c| c.wal_ref.clone())
                .unwrap_or_else(|| wal_ref.to_string());
            let reg = registration_of(&wal, &wal_ref_s);
            if current.is_none() {
                match svc.ledger.register(reg.clone()).await {
                    Ok(RegisterOutcome::Conflict(_)) => continue,
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!(transaction_id = %id, error = %e, "could not register; stopping this pass");
                        return Ok(report);
                    }
                }
            }
            let nonce = uuid::Uuid::new_v4().simple().to_string();
            let msg = message_for(
                &reg,
                Bytes::from(wal.payload.into_bytes()),
                "redrive",
                Some(&format!("redrive:{nonce}")),
                None,
            );
            if let Err(e) = svc.queue.send(vec![msg]).await {
                tracing::warn!(transaction_id = %id, error = %e, "re-enqueue failed; stopping this pass");
                return Ok(report);
            }
            tracing::info!(transaction_id = %id, reason = why, "re-driven from the WAL");
            if let Some(p) = pace {
                tokio::time::sleep(p).await;
            }
        }
    }
    if !o.dry_run {
        metrics::reconciler("missing_from_ledger", report.missing_from_ledger);
        metrics::reconciler("redriven_pending", report.redriven_pending);
        metrics::reconciler("redriven_failed", report.redriven_failed);
        metrics::reconciler("redriven_processing", report.redriven_processing);
    }
    Ok(report)
}

/// Runs a pass every `interval` over the last `lookback`, until `shutdown`.
pub async fn run_periodically(
    svc: std::sync::Arc<Services>,
    interval: Duration,
    lookback: Duration,
    pending_after: Duration,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        let now = Utc::now();
        let o = ReconcileOptions {
            from: now - ChronoDuration::from_std(lookback).unwrap_or_default(),
            to: now,
            pending_after,
            slack: pending_after,
            dry_run: false,
            rate_per_sec: 500,
        };
        match reconcile(&svc, &o).await {
            Ok(r) if r.redriven() > 0 => tracing::warn!(
                redriven = r.redriven(),
                missing = r.missing_from_ledger,
                pending = r.redriven_pending,
                failed = r.redriven_failed,
                processing = r.redriven_processing,
                "reconciler re-drove overdue transactions"
            ),
            Ok(r) => tracing::debug!(records = r.records, "reconciler found nothing overdue"),
            Err(e) => tracing::warn!(error = %e, "reconciler pass failed"),
        }
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = shutdown.wait_for(|s| *s) => return,
        }
    }
}
