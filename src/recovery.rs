//! Recovery after a dependency outage: what is waiting on a dependency right
//! now ([`Waiting`], exported as `rtpd_recovery_waiting` and
//! `rtpd_recovery_oldest_wait_seconds`), and the watcher that notices a
//! dependency (WAL, ledger, queue) coming back and runs a reconcile pass over
//! the recent window at once ([`watch_dependencies`]), instead of leaving
//! stragglers to the next periodic pass and its pending threshold.
//!
//! An early re-drive is safe for the same reasons any re-drive is: the copy
//! carries a distinct message id, the ledger's claim refuses terminal records
//! and live leases of others, the attempt number fences a late settle, and the
//! reconciler corrects from the journal before it re-drives.

use crate::ledger::Ledger;
use crate::metrics;
use crate::queue::Queue;
use crate::reconcile::{ReconcileOptions, Reconciler};
use crate::wal::Log;
use chrono::Duration as ChronoDuration;
use std::{
    collections::BTreeMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};
use tokio::time::Instant;

/// Work held back by a dependency outage: messages the processor keeps locked
/// while the ledger or the journal does not answer, and sends waiting in the
/// in-process resend queue.
#[derive(Debug, Default)]
pub struct Waiting {
    next: AtomicU64,
    since: Mutex<BTreeMap<u64, Instant>>,
}

/// One waiting item; it stops waiting when dropped.
#[derive(Debug)]
pub struct WaitGuard {
    waiting: Arc<Waiting>,
    token: u64,
}

impl Waiting {
    pub fn enter(self: &Arc<Self>) -> WaitGuard {
        let token = self.next.fetch_add(1, Ordering::Relaxed);
        self.lock().insert(token, Instant::now());
        self.publish();
        WaitGuard {
            waiting: self.clone(),
            token,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, Instant>> {
        self.since.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// How many wait, and for how long the oldest has.
    pub fn snapshot(&self) -> (usize, Duration) {
        let since = self.lock();
        let oldest = since.values().min().map_or(Duration::ZERO, |t| t.elapsed());
        (since.len(), oldest)
    }

    /// Sets the gauges (also called on every change, and by the watcher's tick
    /// so the oldest age keeps growing while nothing changes).
    pub fn publish(&self) {
        let (n, oldest) = self.snapshot();
        metrics::recovery_waiting(n, oldest);
    }
}

impl Drop for WaitGuard {
    fn drop(&mut self) {
        self.waiting.lock().remove(&self.token);
        self.waiting.publish();
    }
}

/// A dependency the watcher probes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Dependency {
    Wal,
    Ledger,
    Queue,
}

impl Dependency {
    pub fn as_str(self) -> &'static str {
        match self {
            Dependency::Wal => "wal",
            Dependency::Ledger => "ledger",
            Dependency::Queue => "queue",
        }
    }
}

/// What the watcher probes and, when something returns, re-drives.
pub struct Watch {
    pub wal: Log,
    pub ledger: Arc<dyn Ledger>,
    pub queue: Arc<dyn Queue>,
    /// None in a process without the processor (`rtpd api`): it only
    /// publishes the gauges and logs returns.
    pub reconciler: Option<Arc<Reconciler>>,
    pub waiting: Arc<Waiting>,
    pub every: Duration,
    /// How far back the recovery pass looks when no watermark is known.
    pub lookback: Duration,
    /// The longest a `pending` must have been untouched for the recovery pass
    /// to re-drive it (the pass uses the outage's length when shorter).
    pub pending_after: Duration,
}

/// The shortest pending threshold of a recovery pass: younger ones are
/// still on their way through ingest.
const MIN_PENDING_AFTER: Duration = Duration::from_secs(1);

async fn up<E>(f: impl Future<Output = Result<(), E>>, limit: Duration) -> bool {
    matches!(tokio::time::timeout(limit, f).await, Ok(Ok(())))
}

/// Probes the dependencies every `w.every`; when one that was down answers
/// again, runs a reconcile pass at once and logs
/// `dependency returned: X, re-drove N`. Runs until `shutdown`.
pub async fn watch_dependencies(w: Watch, mut shutdown: tokio::sync::watch::Receiver<bool>) {
    let mut down: BTreeMap<Dependency, Instant> = BTreeMap::new();
    let limit = w.every.max(Duration::from_secs(2));
    loop {
        w.waiting.publish();
        let (wal, ledger, queue) = tokio::join!(
            up(w.wal.ping(), limit),
            up(w.ledger.ping(), limit),
            up(w.queue.ping(), limit)
        );
        let mut returned = Vec::new();
        for (dep, ok) in [
            (Dependency::Wal, wal),
            (Dependency::Ledger, ledger),
            (Dependency::Queue, queue),
        ] {
            match (ok, down.get(&dep)) {
                (false, None) => {
                    tracing::warn!(dependency = dep.as_str(), "dependency down");
                    down.insert(dep, Instant::now());
                }
                (true, Some(since)) => {
                    returned.push((dep, since.elapsed()));
                    down.remove(&dep);
                }
                _ => {}
            }
        }
        // A pass needs the WAL and the ledger (and the queue to re-drive):
        // run it once everything that returned is joined by the rest.
        if !returned.is_empty() {
            let redriven = if down.is_empty() {
                let longest = returned.iter().map(|(_, d)| *d).max().unwrap_or_default();
                recovery_pass(&w, longest).await
            } else {
                None
            };
            for (dep, outage) in &returned {
                metrics::dependency_returned(dep.as_str());
                tracing::warn!(
                    dependency = dep.as_str(),
                    outage_secs = outage.as_secs_f64(),
                    redriven = redriven.unwrap_or(0),
                    "dependency returned: {}, re-drove {}",
                    dep.as_str(),
                    redriven.unwrap_or(0)
                );
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(w.every) => {}
            _ = shutdown.wait_for(|s| *s) => return,
        }
    }
}

/// One reconcile pass from the shared watermark (or the lookback) to now.
/// A `pending` untouched since before the outage began (at most
/// `w.pending_after` ago) is re-driven: its message may have been lost with
/// the queue, or dead-lettered by deliveries the outage burnt. The number
/// re-driven, or None without a reconciler or when the pass could not run.
async fn recovery_pass(w: &Watch, outage: Duration) -> Option<u64> {
    let r = w.reconciler.as_ref()?;
    let now = crate::clock::now();
    let fallback = now - ChronoDuration::from_std(w.lookback).unwrap_or_default();
    let from = match r.ledger.checkpoint(crate::reconcile::WATERMARK).await {
        Ok(Some(t)) => chrono::DateTime::parse_from_rfc3339(&t)
            .map(|t| t.with_timezone(&chrono::Utc))
            .unwrap_or(fallback),
        _ => fallback,
    };
    let pending_after = outage.min(w.pending_after).max(MIN_PENDING_AFTER);
    let mut o = ReconcileOptions::new(from, now, pending_after);
    o.lease = Some(crate::reconcile::LeaseOptions {
        owner: r.instance.clone(),
        ttl: Duration::from_secs(30),
    });
    // The periodic pass may hold the lease right now; it ends soon.
    match r.reconcile_when_free(&o, Duration::from_secs(10)).await {
        Ok(report) => {
            metrics::reconciler("recovery_redriven", report.redriven());
            Some(report.redriven())
        }
        Err(e) => {
            tracing::warn!(error = %e, "recovery reconcile pass failed");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn waiting_counts_what_is_held_until_it_is_released() {
        let w = Arc::new(Waiting::default());
        assert_eq!(w.snapshot().0, 0);
        let a = w.enter();
        let b = w.enter();
        assert_eq!(w.snapshot().0, 2);
        drop(a);
        assert_eq!(w.snapshot().0, 1);
        drop(b);
        assert_eq!(w.snapshot(), (0, Duration::ZERO));
    }
}
