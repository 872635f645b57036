//! Decorators that put a span and a latency metric
//! (`rtpd_port_call_duration_seconds{port, op, result}`) around every ledger
//! and queue call, whatever the adapter. `services` wraps each port once at
//! start-up; the adapters know nothing of it.
//!
//! A call about one transaction names it as every span does:
//! `transaction_id` (the vendor's id) and `transaction_key`
//! (`<vendor>/<id>`, the ledger's and queue's key).
//!
//! A call gets a span only inside a traced flow (an ingest, a processor
//! attempt, a reconcile pass): a probe's ping or an idle receive loop would
//! otherwise start a trace of its own every few seconds.

use crate::ledger::{
    ClaimOutcome, Counts, Ledger, LedgerError, ListQuery, Page, RegisterOutcome, ReplayOutcome,
};
use crate::metrics;
use crate::queue::{OutgoingMessage, Queue, QueueError, ReceivedMessage};
use crate::transaction::{Registration, Settlement, State, TransactionId, TxRecord};
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use std::{future::Future, sync::Arc, time::Duration};
use tokio::time::Instant;
use tracing::Instrument;

async fn observed<T, E>(
    port: &'static str,
    op: &'static str,
    kind: &'static str,
    key: Option<&str>,
    f: impl Future<Output = Result<T, E>>,
) -> Result<T, E> {
    let started = Instant::now();
    let current = tracing::Span::current();
    let result = if current.is_none() {
        f.await
    } else if current
        .metadata()
        .is_some_and(|m| m.name() == RECONCILE_PASS)
    {
        // A reconcile pass checks every recent transaction: its calls name
        // the key under an attribute of their own, or the query that finds a
        // payment by `transaction_id` would return whole passes
        // (docs/observability.md). What the pass does to one payment (a
        // re-drive) is a span of its own that names it.
        let span = tracing::info_span!(
            "port call",
            otel.name = %format_args!("{port}.{op}"),
            otel.kind = kind,
            checked_key = key,
        );
        f.instrument(span).await
    } else {
        let span = tracing::info_span!(
            "port call",
            otel.name = %format_args!("{port}.{op}"),
            otel.kind = kind,
            transaction_id = key.map(TransactionId::vendor_part),
            transaction_key = key,
        );
        f.instrument(span).await
    };
    metrics::port_call(port, op, result.is_ok(), started.elapsed());
    result
}

/// The name of a reconcile pass's span (`crate::reconcile`).
pub const RECONCILE_PASS: &str = "reconcile";

/// A [`Ledger`] that reports every call.
pub struct InstrumentedLedger(pub Arc<dyn Ledger>);

async fn ledger<T>(
    op: &'static str,
    id: Option<&str>,
    f: impl Future<Output = Result<T, LedgerError>>,
) -> Result<T, LedgerError> {
    observed("ledger", op, "client", id, f).await
}

#[async_trait]
impl Ledger for InstrumentedLedger {
    async fn register(&self, reg: Registration) -> Result<RegisterOutcome, LedgerError> {
        let id = reg.transaction_id.to_string();
        ledger("register", Some(&id), self.0.register(reg)).await
    }
    async fn register_with_payload(
        &self,
        reg: Registration,
        payload: &[u8],
    ) -> Result<RegisterOutcome, LedgerError> {
        let id = reg.transaction_id.to_string();
        ledger(
            "register",
            Some(&id),
            self.0.register_with_payload(reg, payload),
        )
        .await
    }
    async fn get(&self, id: &str) -> Result<Option<TxRecord>, LedgerError> {
        ledger("get", Some(id), self.0.get(id)).await
    }
    // Forwarded, not left to the trait's default: the ledger's own may save
    // round trips (PostgreSQL answers in one statement).
    async fn get_first(&self, ids: &[&str]) -> Result<Option<TxRecord>, LedgerError> {
        ledger("get_first", ids.first().copied(), self.0.get_first(ids)).await
    }
    async fn claim(
        &self,
        id: &str,
        owner: &str,
        lease: Duration,
    ) -> Result<ClaimOutcome, LedgerError> {
        ledger("claim", Some(id), self.0.claim(id, owner, lease)).await
    }
    async fn settle(
        &self,
        id: &str,
        owner: &str,
        attempt: u32,
        s: Settlement,
    ) -> Result<TxRecord, LedgerError> {
        ledger("settle", Some(id), self.0.settle(id, owner, attempt, s)).await
    }
    async fn replay_fate(&self, id: &str, nonce: &str) -> Result<Option<TxRecord>, LedgerError> {
        ledger("replay_fate", Some(id), self.0.replay_fate(id, nonce)).await
    }
    async fn release(&self, id: &str, owner: &str, attempt: u32) -> Result<TxRecord, LedgerError> {
        ledger("release", Some(id), self.0.release(id, owner, attempt)).await
    }
    async fn extend_lease(
        &self,
        id: &str,
        owner: &str,
        attempt: u32,
        lease: Duration,
    ) -> Result<TxRecord, LedgerError> {
        ledger(
            "extend_lease",
            Some(id),
            self.0.extend_lease(id, owner, attempt, lease),
        )
        .await
    }
    async fn replay(
        &self,
        id: &str,
        nonce: &str,
        force: bool,
        quiet: Duration,
    ) -> Result<ReplayOutcome, LedgerError> {
        ledger("replay", Some(id), self.0.replay(id, nonce, force, quiet)).await
    }
    async fn restore(&self, rec: TxRecord) -> Result<(), LedgerError> {
        let id = rec.transaction_id.to_string();
        ledger("restore", Some(&id), self.0.restore(rec)).await
    }
    async fn restore_missing(&self, rec: TxRecord) -> Result<bool, LedgerError> {
        let id = rec.transaction_id.to_string();
        ledger("restore_missing", Some(&id), self.0.restore_missing(rec)).await
    }
    async fn restore_if_unchanged(
        &self,
        seen: &TxRecord,
        rec: TxRecord,
    ) -> Result<bool, LedgerError> {
        let id = rec.transaction_id.to_string();
        ledger(
            "restore_if_unchanged",
            Some(&id),
            self.0.restore_if_unchanged(seen, rec),
        )
        .await
    }
    async fn try_lease(&self, name: &str, owner: &str, ttl: Duration) -> Result<bool, LedgerError> {
        ledger("try_lease", None, self.0.try_lease(name, owner, ttl)).await
    }
    async fn checkpoint(&self, name: &str) -> Result<Option<String>, LedgerError> {
        ledger("checkpoint", None, self.0.checkpoint(name)).await
    }
    async fn set_checkpoint(&self, name: &str, value: &str) -> Result<(), LedgerError> {
        ledger("set_checkpoint", None, self.0.set_checkpoint(name, value)).await
    }
    async fn list(&self, q: ListQuery) -> Result<Page, LedgerError> {
        ledger("list", None, self.0.list(q)).await
    }
    async fn counts(&self) -> Result<Counts, LedgerError> {
        ledger("counts", None, self.0.counts()).await
    }
    async fn oldest_update(&self, state: State) -> Result<Option<DateTime<Utc>>, LedgerError> {
        ledger("oldest_update", None, self.0.oldest_update(state)).await
    }
    async fn ping(&self) -> Result<(), LedgerError> {
        ledger("ping", None, self.0.ping()).await
    }
    fn describe(&self) -> String {
        self.0.describe()
    }
    async fn intact(&self) -> Result<bool, LedgerError> {
        ledger("intact", None, self.0.intact()).await
    }
    async fn begin_rebuild(&self, token: &str) -> Result<(), LedgerError> {
        ledger("begin_rebuild", None, self.0.begin_rebuild(token)).await
    }
    async fn mark_intact(&self, token: &str) -> Result<bool, LedgerError> {
        ledger("mark_intact", None, self.0.mark_intact(token)).await
    }
    async fn refused_while_lost(
        &self,
        id: &str,
        wal_refs: &[String],
    ) -> Result<Vec<String>, LedgerError> {
        ledger(
            "refused_while_lost",
            Some(id),
            self.0.refused_while_lost(id, wal_refs),
        )
        .await
    }
}

/// A [`Queue`] that reports every call.
pub struct InstrumentedQueue(pub Arc<dyn Queue>);

async fn queue<T>(
    op: &'static str,
    kind: &'static str,
    m: Option<&ReceivedMessage>,
    f: impl Future<Output = Result<T, QueueError>>,
) -> Result<T, QueueError> {
    let id = m.and_then(crate::envelope::transaction_id_of);
    observed("queue", op, kind, id, f).await
}

#[async_trait]
impl Queue for InstrumentedQueue {
    async fn send(&self, messages: Vec<OutgoingMessage>) -> Result<(), QueueError> {
        let id = match messages.as_slice() {
            [one] => one
                .properties
                .get(crate::envelope::props::TRANSACTION_ID)
                .cloned(),
            _ => None,
        };
        observed(
            "queue",
            "send",
            "producer",
            id.as_deref(),
            self.0.send(messages),
        )
        .await
    }
    async fn receive(
        &self,
        max: usize,
        wait: Duration,
    ) -> Result<Vec<ReceivedMessage>, QueueError> {
        queue("receive", "consumer", None, self.0.receive(max, wait)).await
    }
    async fn receive_dead_letters(
        &self,
        max: usize,
        wait: Duration,
    ) -> Result<Vec<ReceivedMessage>, QueueError> {
        queue(
            "receive_dead_letters",
            "consumer",
            None,
            self.0.receive_dead_letters(max, wait),
        )
        .await
    }
    async fn peek_dead_letters(
        &self,
        from: i64,
        max: usize,
    ) -> Result<Vec<ReceivedMessage>, QueueError> {
        queue(
            "peek_dead_letters",
            "client",
            None,
            self.0.peek_dead_letters(from, max),
        )
        .await
    }
    async fn complete(&self, m: &ReceivedMessage) -> Result<(), QueueError> {
        queue("complete", "client", Some(m), self.0.complete(m)).await
    }
    async fn abandon(&self, m: &ReceivedMessage) -> Result<(), QueueError> {
        queue("abandon", "client", Some(m), self.0.abandon(m)).await
    }
    async fn dead_letter(
        &self,
        m: &ReceivedMessage,
        reason: &str,
        description: &str,
    ) -> Result<(), QueueError> {
        queue(
            "dead_letter",
            "client",
            Some(m),
            self.0.dead_letter(m, reason, description),
        )
        .await
    }
    async fn renew_lock(&self, m: &ReceivedMessage) -> Result<DateTime<Utc>, QueueError> {
        queue("renew_lock", "client", Some(m), self.0.renew_lock(m)).await
    }
    async fn ping(&self) -> Result<(), QueueError> {
        queue("ping", "client", None, self.0.ping()).await
    }
    fn describe(&self) -> String {
        self.0.describe()
    }
}
