//! The seeded chance the simulation draws from, the fault switches, and the
//! fault-injecting wrappers around the ports: every operation can be delayed,
//! fail before it takes effect, fail after it took effect (the ambiguous
//! case), or hang until its caller's timeout and then fail either way.

use async_trait::async_trait;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use rand::{RngExt, SeedableRng, rngs::StdRng};
use rtp_durability::envelope::props;
use rtp_durability::ledger::memory::MemoryLedger;
use rtp_durability::ledger::{
    ClaimOutcome, Counts, Ledger, LedgerError, ListQuery, Page, RegisterOutcome, ReplayOutcome,
};
use rtp_durability::queue::memory::MemoryQueue;
use rtp_durability::queue::{OutgoingMessage, Queue, QueueError, ReceivedMessage};
use rtp_durability::transaction::{Registration, Settlement, State, TxRecord};
use rtp_durability::wal::store::{ObjectInfo, ObjectStore, PutOptions, StoreError};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;

/// The simulation's own seeded generator (the pipeline's is in `clock`).
#[derive(Clone)]
pub struct Chance(Arc<Mutex<StdRng>>);

impl Chance {
    pub fn new(seed: u64) -> Chance {
        Chance(Arc::new(Mutex::new(StdRng::seed_from_u64(
            seed ^ 0x5157_u64.rotate_left(40),
        ))))
    }
    pub fn p(&self, prob: f64) -> bool {
        prob > 0.0 && self.0.lock().unwrap().random_bool(prob.min(1.0))
    }
    pub fn range(&self, lo: u64, hi: u64) -> u64 {
        self.0.lock().unwrap().random_range(lo..=hi)
    }
    pub fn ms(&self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(self.range(lo, hi))
    }
    pub fn pick<T: Clone>(&self, items: &[T]) -> Option<T> {
        (!items.is_empty()).then(|| items[self.range(0, items.len() as u64 - 1) as usize].clone())
    }
}

/// How the downstream misbehaves during a storm.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Storm {
    ServerErrors,
    TooManyRequests,
    Hangs,
}

/// The fault switches: rates drawn per seed, windows set by the schedule,
/// everything off in the quiescent phase.
pub struct Switches {
    pub on: bool,
    /// Per operation: fail before, fail after, hang.
    pub p_before: f64,
    pub p_after: f64,
    pub p_hang: f64,
    pub p_delay: f64,
    pub max_delay_ms: u64,
    /// A conditional blob PUT that landed but whose SDK-internal retry got
    /// 409 on the first try (the caller sees `AlreadyExists`).
    pub p_put_conflict_after_landing: f64,
    pub ledger_down_until: Option<Instant>,
    pub storm: Option<(Storm, Instant)>,
    /// Chance per downstream call of each answer outside storms.
    pub p_transient: f64,
    pub p_permanent: f64,
    pub p_answer_lost: f64,
}

#[derive(Clone)]
pub struct Faults {
    pub chance: Chance,
    pub sw: Arc<Mutex<Switches>>,
    /// How long a hung operation takes before its client gives up.
    pub hang: Duration,
    pub log: crate::history::Recorder,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Fate {
    Ok,
    Before,
    After,
}

impl Faults {
    pub fn off(&self) {
        let mut s = self.sw.lock().unwrap();
        s.on = false;
        s.ledger_down_until = None;
        s.storm = None;
    }

    pub fn is_on(&self) -> bool {
        self.sw.lock().unwrap().on
    }

    pub fn storm(&self) -> Option<Storm> {
        let s = self.sw.lock().unwrap();
        s.storm
            .filter(|(_, until)| s.on && Instant::now() < *until)
            .map(|(k, _)| k)
    }

    /// Decides one operation's fate and waits out its delay or hang.
    async fn fate(&self, op: &'static str, id: &str, may_land: bool) -> Fate {
        let (on, pb, pa, ph, pd, md, down) = {
            let s = self.sw.lock().unwrap();
            (
                s.on,
                s.p_before,
                s.p_after,
                s.p_hang,
                s.p_delay,
                s.max_delay_ms,
                s.ledger_down_until,
            )
        };
        if !on {
            return Fate::Ok;
        }
        if op.starts_with("ledger.") && down.is_some_and(|u| Instant::now() < u) {
            return Fate::Before;
        }
        if self.chance.p(pd) {
            tokio::time::sleep(self.chance.ms(1, md.max(1))).await;
        }
        if self.chance.p(ph) {
            tokio::time::sleep(self.hang).await;
            let fate = if may_land && self.chance.p(0.5) {
                Fate::After
            } else {
                Fate::Before
            };
            self.log
                .note(format!("fault {op} {id} hung then failed {fate:?}"));
            return fate;
        }
        if self.chance.p(pb) {
            self.log.note(format!("fault {op} {id} failed before"));
            return Fate::Before;
        }
        if may_land && self.chance.p(pa) {
            self.log
                .note(format!("fault {op} {id} failed after taking effect"));
            return Fate::After;
        }
        Fate::Ok
    }
}

macro_rules! guarded {
    ($self:ident, $op:literal, $land:expr, $err:expr, $call:expr) => {{ guarded!($self, $op, "", $land, $err, $call) }};
    ($self:ident, $op:literal, $id:expr, $land:expr, $err:expr, $call:expr) => {{
        match $self.f.fate($op, $id, $land).await {
            Fate::Before => Err($err),
            Fate::After => {
                let _ = $call.await;
                Err($err)
            }
            Fate::Ok => $call.await,
        }
    }};
}

pub struct FaultyLedger {
    pub inner: Arc<dyn Ledger>,
    pub f: Faults,
}

fn lerr() -> LedgerError {
    LedgerError::Unavailable("simulated fault".into())
}

#[async_trait]
impl Ledger for FaultyLedger {
    async fn register(&self, reg: Registration) -> Result<RegisterOutcome, LedgerError> {
        guarded!(
            self,
            "ledger.register",
            reg.transaction_id.as_str(),
            true,
            lerr(),
            self.inner.register(reg.clone())
        )
    }
    async fn get(&self, id: &str) -> Result<Option<TxRecord>, LedgerError> {
        guarded!(self, "ledger.get", id, false, lerr(), self.inner.get(id))
    }
    async fn claim(
        &self,
        id: &str,
        owner: &str,
        lease: Duration,
    ) -> Result<ClaimOutcome, LedgerError> {
        guarded!(
            self,
            "ledger.claim",
            id,
            true,
            lerr(),
            self.inner.claim(id, owner, lease)
        )
    }
    async fn settle(
        &self,
        id: &str,
        owner: &str,
        attempt: u32,
        s: Settlement,
    ) -> Result<TxRecord, LedgerError> {
        guarded!(
            self,
            "ledger.settle",
            id,
            true,
            lerr(),
            self.inner.settle(id, owner, attempt, s.clone())
        )
    }
    async fn replay_fate(&self, id: &str, nonce: &str) -> Result<Option<TxRecord>, LedgerError> {
        guarded!(
            self,
            "ledger.replay_fate",
            id,
            false,
            lerr(),
            self.inner.replay_fate(id, nonce)
        )
    }
    async fn release(&self, id: &str, owner: &str, attempt: u32) -> Result<TxRecord, LedgerError> {
        guarded!(
            self,
            "ledger.release",
            id,
            true,
            lerr(),
            self.inner.release(id, owner, attempt)
        )
    }
    async fn extend_lease(
        &self,
        id: &str,
        owner: &str,
        attempt: u32,
        lease: Duration,
    ) -> Result<TxRecord, LedgerError> {
        guarded!(
            self,
            "ledger.extend_lease",
            id,
            true,
            lerr(),
            self.inner.extend_lease(id, owner, attempt, lease)
        )
    }
    async fn replay(
        &self,
        id: &str,
        nonce: &str,
        force: bool,
        quiet: Duration,
    ) -> Result<ReplayOutcome, LedgerError> {
        guarded!(
            self,
            "ledger.replay",
            id,
            true,
            lerr(),
            self.inner.replay(id, nonce, force, quiet)
        )
    }
    async fn restore(&self, rec: TxRecord) -> Result<(), LedgerError> {
        guarded!(
            self,
            "ledger.restore",
            rec.transaction_id.as_str(),
            true,
            lerr(),
            self.inner.restore(rec.clone())
        )
    }
    async fn restore_missing(&self, rec: TxRecord) -> Result<bool, LedgerError> {
        guarded!(
            self,
            "ledger.restore_missing",
            rec.transaction_id.as_str(),
            true,
            lerr(),
            self.inner.restore_missing(rec.clone())
        )
    }
    async fn restore_if_unchanged(
        &self,
        seen: &TxRecord,
        rec: TxRecord,
    ) -> Result<bool, LedgerError> {
        guarded!(
            self,
            "ledger.restore_if_unchanged",
            rec.transaction_id.as_str(),
            true,
            lerr(),
            self.inner.restore_if_unchanged(seen, rec.clone())
        )
    }
    async fn try_lease(&self, name: &str, owner: &str, ttl: Duration) -> Result<bool, LedgerError> {
        guarded!(
            self,
            "ledger.try_lease",
            true,
            lerr(),
            self.inner.try_lease(name, owner, ttl)
        )
    }
    async fn checkpoint(&self, name: &str) -> Result<Option<String>, LedgerError> {
        guarded!(
            self,
            "ledger.checkpoint",
            false,
            lerr(),
            self.inner.checkpoint(name)
        )
    }
    async fn set_checkpoint(&self, name: &str, value: &str) -> Result<(), LedgerError> {
        guarded!(
            self,
            "ledger.set_checkpoint",
            true,
            lerr(),
            self.inner.set_checkpoint(name, value)
        )
    }
    async fn list(&self, q: ListQuery) -> Result<Page, LedgerError> {
        guarded!(
            self,
            "ledger.list",
            false,
            lerr(),
            self.inner.list(q.clone())
        )
    }
    async fn counts(&self) -> Result<Counts, LedgerError> {
        guarded!(self, "ledger.counts", false, lerr(), self.inner.counts())
    }
    async fn oldest_update(
        &self,
        state: rtp_durability::transaction::State,
    ) -> Result<Option<chrono::DateTime<chrono::Utc>>, LedgerError> {
        guarded!(
            self,
            "ledger.oldest_update",
            false,
            lerr(),
            self.inner.oldest_update(state)
        )
    }
    async fn ping(&self) -> Result<(), LedgerError> {
        guarded!(self, "ledger.ping", false, lerr(), self.inner.ping())
    }
    fn describe(&self) -> String {
        format!("faulty {}", self.inner.describe())
    }
    async fn intact(&self) -> Result<bool, LedgerError> {
        guarded!(self, "ledger.intact", false, lerr(), self.inner.intact())
    }
    async fn begin_rebuild(&self, token: &str) -> Result<(), LedgerError> {
        guarded!(
            self,
            "ledger.begin_rebuild",
            true,
            lerr(),
            self.inner.begin_rebuild(token)
        )
    }
    async fn mark_intact(&self, token: &str) -> Result<bool, LedgerError> {
        guarded!(
            self,
            "ledger.mark_intact",
            true,
            lerr(),
            self.inner.mark_intact(token)
        )
    }
    async fn refused_while_lost(
        &self,
        id: &str,
        wal_refs: &[String],
    ) -> Result<Vec<String>, LedgerError> {
        guarded!(
            self,
            "ledger.refused_while_lost",
            id,
            false,
            lerr(),
            self.inner.refused_while_lost(id, wal_refs)
        )
    }
}

pub struct FaultyQueue {
    pub inner: Arc<dyn Queue>,
    pub f: Faults,
    /// To see, when a retry copy is completed, whether its transaction still waits for it.
    pub ledger: Arc<MemoryLedger>,
    pub memory: Arc<MemoryQueue>,
}

fn qerr() -> QueueError {
    QueueError::Unavailable("simulated fault".into())
}

#[async_trait]
impl Queue for FaultyQueue {
    async fn send(&self, messages: Vec<OutgoingMessage>) -> Result<(), QueueError> {
        guarded!(
            self,
            "queue.send",
            true,
            qerr(),
            self.inner.send(messages.clone())
        )
    }
    async fn receive(
        &self,
        max: usize,
        wait: Duration,
    ) -> Result<Vec<ReceivedMessage>, QueueError> {
        // A receive that fails after locking leaves the messages to their lock expiry.
        guarded!(
            self,
            "queue.receive",
            true,
            qerr(),
            self.inner.receive(max, wait)
        )
    }
    async fn receive_dead_letters(
        &self,
        max: usize,
        wait: Duration,
    ) -> Result<Vec<ReceivedMessage>, QueueError> {
        self.inner.receive_dead_letters(max, wait).await
    }
    async fn peek_dead_letters(
        &self,
        from: i64,
        max: usize,
    ) -> Result<Vec<ReceivedMessage>, QueueError> {
        self.inner.peek_dead_letters(from, max).await
    }
    async fn complete(&self, m: &ReceivedMessage) -> Result<(), QueueError> {
        let r = guarded!(self, "queue.complete", true, qerr(), self.inner.complete(m));
        if r.is_ok()
            && m.properties.get(props::KIND).map(String::as_str) == Some("retry")
            && let Some(id) = m.properties.get(props::TRANSACTION_ID)
            && let Ok(Some(rec)) = self.ledger.get(id).await
            && rec.status == State::Failed
            && m.properties
                .get(props::DELIVERY)
                .and_then(|n| n.parse::<u32>().ok())
                == Some(rec.attempts + 1)
            && !self
                .memory
                .main_messages()
                .iter()
                .any(|o| o.properties.get(props::TRANSACTION_ID) == Some(id))
        {
            self.f.log.retry_dropped(id, &m.message_id);
        }
        r
    }
    async fn abandon(&self, m: &ReceivedMessage) -> Result<(), QueueError> {
        guarded!(self, "queue.abandon", true, qerr(), self.inner.abandon(m))
    }
    async fn dead_letter(
        &self,
        m: &ReceivedMessage,
        reason: &str,
        description: &str,
    ) -> Result<(), QueueError> {
        guarded!(
            self,
            "queue.dead_letter",
            true,
            qerr(),
            self.inner.dead_letter(m, reason, description)
        )
    }
    async fn renew_lock(&self, m: &ReceivedMessage) -> Result<DateTime<Utc>, QueueError> {
        guarded!(
            self,
            "queue.renew_lock",
            true,
            qerr(),
            self.inner.renew_lock(m)
        )
    }
    async fn ping(&self) -> Result<(), QueueError> {
        self.inner.ping().await
    }
    fn describe(&self) -> String {
        format!("faulty {}", self.inner.describe())
    }
}

pub struct FaultyStore {
    pub inner: Arc<dyn ObjectStore>,
    pub f: Faults,
}

fn serr() -> StoreError {
    StoreError::Unavailable("simulated fault".into())
}

#[async_trait]
impl ObjectStore for FaultyStore {
    async fn put_new(&self, key: &str, body: Bytes, opts: &PutOptions) -> Result<(), StoreError> {
        let r = guarded!(
            self,
            "store.put_new",
            true,
            serr(),
            self.inner.put_new(key, body.clone(), opts)
        )?;
        let p = self.f.sw.lock().unwrap().p_put_conflict_after_landing;
        if self.f.is_on() && self.f.chance.p(p) {
            // The SDK retried a PUT whose first answer was lost; the retry found its own blob.
            self.f.log.note(format!(
                "fault store.put_new {key} landed, answered AlreadyExists"
            ));
            return Err(StoreError::AlreadyExists(key.to_owned()));
        }
        Ok(r)
    }
    async fn get(&self, key: &str) -> Result<Bytes, StoreError> {
        guarded!(self, "store.get", false, serr(), self.inner.get(key))
    }
    async fn get_range(&self, key: &str, offset: u64, len: u64) -> Result<Bytes, StoreError> {
        guarded!(
            self,
            "store.get_range",
            false,
            serr(),
            self.inner.get_range(key, offset, len)
        )
    }
    async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>, StoreError> {
        guarded!(self, "store.list", false, serr(), self.inner.list(prefix))
    }
    async fn ping(&self) -> Result<(), StoreError> {
        self.inner.ping().await
    }
    fn describe(&self) -> String {
        format!("faulty {}", self.inner.describe())
    }
}
