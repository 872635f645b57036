//! The in-process resend queue: queue sends that failed after the ledger was
//! already written (ingest's `"enqueued": false`, a retry copy) are retried
//! here with back-off as soon as the queue answers again, instead of waiting
//! minutes for the reconciler. The reconciler stays the safety net: this
//! queue lives in memory, is bounded ([`CAPACITY`]), and what it drops or a
//! crash loses is still `pending`/`failed` in the ledger and in the WAL.
//!
//! Resending is safe: a copy keeps its message id (duplicate detection drops
//! it if the first send landed after all), and the ledger's claim makes any
//! redundant copy harmless.

use crate::backoff::Backoff;
use crate::metrics;
use crate::queue::{OutgoingMessage, Queue, QueueError};
use crate::recovery::{WaitGuard, Waiting};
use std::{
    collections::VecDeque,
    sync::{Arc, Mutex, Weak},
    time::Duration,
};
use tokio::sync::Notify;

/// Messages held at most; beyond it a failed send is left to the reconciler.
pub const CAPACITY: usize = 10_000;
/// First and longest wait between tries while the queue does not answer.
pub const BACKOFF_BASE: Duration = Duration::from_millis(100);
pub const BACKOFF_MAX: Duration = Duration::from_secs(2);

struct Item {
    transaction_id: String,
    message: OutgoingMessage,
    _waiting: WaitGuard,
}

struct Inner {
    queue: Arc<dyn Queue>,
    items: Mutex<VecDeque<Item>>,
    wake: Notify,
    capacity: usize,
    waiting: Arc<Waiting>,
}

/// A handle on the resend queue; cheap to clone. The worker stops when the
/// last handle is dropped.
#[derive(Clone)]
pub struct Resend {
    inner: Arc<Inner>,
}

impl Resend {
    /// Starts the worker on the current Tokio runtime.
    pub fn start(queue: Arc<dyn Queue>, waiting: Arc<Waiting>, capacity: usize) -> Resend {
        let inner = Arc::new(Inner {
            queue,
            items: Mutex::new(VecDeque::new()),
            wake: Notify::new(),
            capacity,
            waiting,
        });
        tokio::spawn(run(Arc::downgrade(&inner)));
        Resend { inner }
    }

    /// Hands over a message whose send failed with `error`, if resending can
    /// help: only a retryable error (`Unavailable`) is queued. A permanent
    /// refusal (too large, not found, unauthorized, fatal) is not: it is
    /// logged and counted (`result="refused"`) and the transaction stays
    /// `pending` for the reconciler. False when not queued.
    pub fn push_failed(
        &self,
        transaction_id: &str,
        message: OutgoingMessage,
        error: &QueueError,
    ) -> bool {
        if !error.is_retryable() {
            refused(transaction_id, error);
            return false;
        }
        self.push(transaction_id, message)
    }

    /// Hands over a message whose send failed. False when the queue is full:
    /// the message is then left to the reconciler.
    /// A message whose id is already waiting is not held twice (a vendor
    /// retrying a pending transaction while the queue is down): true, as it
    /// will be sent.
    pub fn push(&self, transaction_id: &str, message: OutgoingMessage) -> bool {
        let mut items = self.lock();
        if items
            .iter()
            .any(|i| i.message.message_id == message.message_id)
        {
            drop(items);
            metrics::resend("already_queued");
            return true;
        }
        if items.len() >= self.inner.capacity {
            drop(items);
            metrics::resend("dropped");
            tracing::warn!(
                transaction_id,
                "resend queue full; the reconciler will re-drive it"
            );
            return false;
        }
        items.push_back(Item {
            transaction_id: transaction_id.to_owned(),
            message,
            _waiting: self.inner.waiting.enter(),
        });
        drop(items);
        metrics::resend("queued");
        self.inner.wake.notify_one();
        true
    }

    /// Messages waiting to be sent.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Item>> {
        lock(&self.inner)
    }
}

fn lock(inner: &Inner) -> std::sync::MutexGuard<'_, VecDeque<Item>> {
    inner.items.lock().unwrap_or_else(|e| e.into_inner())
}

/// A message the queue refuses for good: not resent; the reconciler re-drives
/// the `pending` transaction from the WAL (and an operator sees it overdue).
fn refused(transaction_id: &str, error: &QueueError) {
    metrics::resend("refused");
    tracing::error!(
        transaction_id,
        error = %error,
        "the queue refused the message for good; not resending it (the transaction stays pending for the reconciler)"
    );
}

async fn run(weak: Weak<Inner>) {
    let mut backoff = Backoff::new(BACKOFF_BASE, BACKOFF_MAX);
    loop {
        let Some(inner) = weak.upgrade() else { return };
        let front = lock(&inner)
            .front()
            .map(|i| (i.transaction_id.clone(), i.message.clone()));
        let Some((id, message)) = front else {
            // Wake on a push, or now and then to notice the last handle is gone.
            let _ = tokio::time::timeout(Duration::from_secs(1), inner.wake.notified()).await;
            continue;
        };
        match inner.queue.send(vec![message]).await {
            Ok(()) => {
                lock(&inner).pop_front();
                backoff.reset();
                metrics::resend("sent");
                tracing::info!(transaction_id = %id, "resent after a failed send");
            }
            Err(e) if !e.is_retryable() => {
                // Sending it again cannot help, and it must not hold up the
                // messages behind it: drop it; the ledger keeps it `pending`.
                lock(&inner).pop_front();
                backoff.reset();
                refused(&id, &e);
            }
            Err(e) => {
                metrics::resend("failed");
                let pause = backoff.next_delay();
                tracing::warn!(transaction_id = %id, error = %e, waiting = lock(&inner).len(), "resend failed; retrying in {pause:?}");
                drop(inner);
                crate::clock::sleep(pause).await;
            }
        }
    }
}
