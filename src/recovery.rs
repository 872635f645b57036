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

use crate::clock::Instant;
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
    /// Rebuilds a ledger found without its intact mark (every process: an
    /// `rtpd api` refuses registrations until the ledger is rebuilt).
    pub rebuilder: Arc<Reconciler>,
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

/// Passes run at most this often: a flapping dependency gets one pass per
/// interval, not one per return.
const MIN_PASS_INTERVAL: Duration = Duration::from_secs(5);
/// How long a pass owed after a return is tried (another instance holding
/// the reconciler lease) before it is left to the periodic reconciler.
const OWED_PATIENCE: Duration = Duration::from_secs(30);

/// A recovery pass owed since a return.
#[derive(Debug, Clone, Copy)]
struct Owed {
    /// The queue was among what returned: messages may be lost with it.
    queue: bool,
    /// The longest of the queue outages that returned.
    queue_outage: Duration,
    /// The longest outage that returned.
    longest: Duration,
    since: Instant,
}

/// Probes the dependencies every `w.every`; when one that was down answers
/// again, runs a reconcile pass (at most one per [`MIN_PASS_INTERVAL`],
/// only while this instance can take the reconciler lease) and logs
/// `dependency returned: X, re-drove N`. Runs until `shutdown`.
///
/// What the pass re-drives depends on what returned. After a ledger or WAL
/// outage the queue kept its messages: `pending` records are left alone (a
/// queued backlog is not copied), only journal corrections, expired leases
/// and overdue retries. After a queue outage, `pending` records untouched
/// since before the outage began are re-driven (their messages may be lost
/// with the queue); younger ones were sent, or are in a resend queue.
pub async fn watch_dependencies(w: Watch, mut shutdown: tokio::sync::watch::Receiver<bool>) {
    let mut down: BTreeMap<Dependency, Instant> = BTreeMap::new();
    let limit = w.every.max(Duration::from_secs(2));
    let mut owed: Option<Owed> = None;
    let mut last_pass: Option<Instant> = None;
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
        for (dep, outage) in &returned {
            metrics::dependency_returned(dep.as_str());
            let o = owed.get_or_insert(Owed {
                queue: false,
                queue_outage: Duration::ZERO,
                longest: Duration::ZERO,
                since: Instant::now(),
            });
            o.longest = o.longest.max(*outage);
            if *dep == Dependency::Queue {
                o.queue = true;
                o.queue_outage = o.queue_outage.max(*outage);
            }
            tracing::warn!(
                dependency = dep.as_str(),
                outage_secs = outage.as_secs_f64(),
                "dependency returned: {}",
                dep.as_str()
            );
        }
        // A ledger that lost its data (or is new) is rebuilt before ingest
        // may register anything in it (issue 12, N1).
        let mut rebuilt = true;
        if ledger && wal {
            match w.rebuilder.rebuild_if_lost(w.lookback).await {
                Ok(None | Some(true)) => {}
                Ok(Some(false)) => rebuilt = false,
                Err(e) => {
                    rebuilt = false;
                    tracing::warn!(error = %e, "ledger rebuild failed; tried again");
                }
            }
        }
        // A pass needs the WAL and the ledger (and the queue to re-drive):
        // run it once everything that returned is joined by the rest.
        if let Some(o) = owed
            && rebuilt
            && down.is_empty()
            && last_pass.is_none_or(|t| t.elapsed() >= MIN_PASS_INTERVAL)
        {
            match recovery_pass(&w, o).await {
                Pass::Ran(redriven) => {
                    last_pass = Some(Instant::now());
                    owed = None;
                    tracing::warn!(
                        redriven,
                        queue_returned = o.queue,
                        "dependency returned: re-drove {redriven}"
                    );
                }
                Pass::Skipped => owed = None,
                Pass::Failed if o.since.elapsed() < OWED_PATIENCE => {
                    last_pass = Some(Instant::now());
                }
                Pass::Failed => owed = None,
                Pass::Busy if o.since.elapsed() >= OWED_PATIENCE => {
                    tracing::warn!(
                        "recovery pass not run: the reconciler lease stayed with another pass; the periodic reconciler covers it"
                    );
                    owed = None;
                }
                Pass::Busy => {}
            }
        }
        tokio::select! {
            _ = crate::clock::sleep(w.every) => {}
            _ = shutdown.wait_for(|s| *s) => return,
        }
    }
}

enum Pass {
    /// Ran; the number re-driven.
    Ran(u64),
    /// Another pass holds the reconciler lease; try again later.
    Busy,
    /// Failed; tried again after [`MIN_PASS_INTERVAL`].
    Failed,
    /// Not run here (no reconciler in this process).
    Skipped,
}

/// One reconcile pass from the shared watermark (or the lookback) to now,
/// under the reconciler lease (not waiting for it: whoever holds it is
/// running a pass). See [`watch_dependencies`] for what it re-drives.
async fn recovery_pass(w: &Watch, owed: Owed) -> Pass {
    let Some(r) = w.reconciler.as_ref() else {
        return Pass::Skipped;
    };
    let now = crate::clock::now();
    let fallback = now - ChronoDuration::from_std(w.lookback).unwrap_or_default();
    let from = match r.ledger.checkpoint(crate::reconcile::WATERMARK).await {
        Ok(Some(t)) => chrono::DateTime::parse_from_rfc3339(&t)
            .map(|t| t.with_timezone(&chrono::Utc))
            .unwrap_or(fallback),
        _ => fallback,
    };
    let threshold = owed.longest.min(w.pending_after).max(MIN_PENDING_AFTER);
    let mut o = ReconcileOptions::new(from, now, threshold);
    if owed.queue {
        // Untouched since before the queue went away (not capped: younger
        // ones were sent while it was up, or are in a resend queue).
        o.pending_after = owed.queue_outage.max(MIN_PENDING_AFTER);
    } else {
        o.redrive_pending = false;
    }
    o.lease = Some(crate::reconcile::LeaseOptions {
        owner: r.instance.clone(),
        ttl: Duration::from_secs(30),
    });
    match r.reconcile(&o).await {
        Ok(report) => {
            metrics::reconciler("recovery_redriven", report.redriven());
            Pass::Ran(report.redriven())
        }
        Err(crate::reconcile::ReconcileError::LeaseHeld) => Pass::Busy,
        Err(e) => {
            tracing::warn!(error = %e, "recovery reconcile pass failed");
            Pass::Failed
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
