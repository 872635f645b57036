//! SCRATCH (reviewer, uncommitted): probes of fc523a2 and 8358832. Each test
//! runs in its own process under nextest (they move the process clock).

use chrono::{Duration as ChronoDuration, Utc};
use rtp_durability::journal::{EntryKind, Journal, JournalEntry, SHARED_INDEX_MAX_IDS, SharedIndex};
use rtp_durability::ledger::redis::{DEFAULT_TIMEOUT, RedisLedger, RedisSettings};
use rtp_durability::ledger::{ClaimOutcome, Ledger, ReplayOutcome};
use rtp_durability::transaction::{Registration, Settlement, State, TransactionId};
use rtp_durability::wal::store::{ObjectInfo, ObjectStore, PutOptions, StoreError};
use rtp_durability::wal::{GroupCommit, JOURNAL_PREFIX, Log, memory::MemoryStore};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// A store whose first armed `list` takes its snapshot, then parks until released.
#[derive(Default)]
struct GatedStore {
    inner: MemoryStore,
    armed: AtomicBool,
    in_list: tokio::sync::Notify,
    release: tokio::sync::Notify,
}

#[async_trait::async_trait]
impl ObjectStore for GatedStore {
    async fn put_new(&self, key: &str, body: bytes::Bytes, o: &PutOptions) -> Result<(), StoreError> {
        self.inner.put_new(key, body, o).await
    }
    async fn get(&self, key: &str) -> Result<bytes::Bytes, StoreError> {
        self.inner.get(key).await
    }
    async fn get_range(&self, key: &str, off: u64, len: u64) -> Result<bytes::Bytes, StoreError> {
        self.inner.get_range(key, off, len).await
    }
    async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>, StoreError> {
        let snap = self.inner.list(prefix).await?;
        if self.armed.swap(false, Ordering::SeqCst) {
            self.in_list.notify_one();
            self.release.notified().await;
        }
        Ok(snap)
    }
    async fn ping(&self) -> Result<(), StoreError> {
        Ok(())
    }
    fn describe(&self) -> String {
        "gated".into()
    }
}

fn success(id: &str) -> JournalEntry {
    JournalEntry {
        v: 1,
        kind: EntryKind::Attempt,
        transaction_id: id.into(),
        at: rtp_durability::clock::now(),
        attempt: Some(1),
        state: State::Success,
        error: None,
        next_retry_at: None,
        actor: "w1".into(),
        reason: None,
        sha256: None,
        wal_ref: None,
        replay_nonce: None,
    }
}

/// fc523a2: under tokio's paused clock (the deterministic simulation) a
/// refresh that listed BEFORE a success was journaled carries the same
/// `Instant` as a caller that asks AFTER it, so `started >= asked` holds and
/// the caller takes a listing that cannot contain the success.
#[tokio::test(start_paused = true)]
async fn paused_clock_caller_takes_a_refresh_that_listed_before_the_success() {
    let store = Arc::new(GatedStore::default());
    let journal = Journal::new(Log::start(store.clone(), JOURNAL_PREFIX, "t", GroupCommit::default()));
    let from = rtp_durability::clock::now() - ChronoDuration::minutes(1);
    let shared = Arc::new(SharedIndex::default());
    store.armed.store(true, Ordering::SeqCst);
    // Worker R (some other transaction's ledger miss) starts a refresh; its
    // listing is taken and it parks before returning.
    let r = {
        let (shared, journal) = (shared.clone(), journal.clone());
        tokio::spawn(async move { shared.refresh(&journal, from, SHARED_INDEX_MAX_IDS).await })
    };
    store.in_list.notified().await;
    let listed_at = tokio::time::Instant::now();
    // Worker W journals a success for "paid" (the ledger then loses it).
    journal.append(&success("paid")).await.unwrap();
    // Worker C claims "paid" afterwards and reads the journal before calling.
    let c = {
        let (shared, journal) = (shared.clone(), journal.clone());
        tokio::spawn(async move {
            let asked = tokio::time::Instant::now();
            shared.refresh(&journal, from, SHARED_INDEX_MAX_IDS).await.unwrap();
            (asked, shared.index.lock().await.known("paid"))
        })
    };
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
    store.release.notify_one();
    r.await.unwrap().unwrap();
    let (asked, known) = c.await.unwrap();
    assert!(
        known.is_some(),
        "journaled success invisible to a read asked after it (refresh listed at {listed_at:?}, caller asked at {asked:?}: equal Instants)"
    );
}

/// Control: the same interleaving on a running clock: the caller's
/// `asked` is later than the refresh's `started`, so it lists itself.
#[tokio::test]
async fn running_clock_control() {
    let store = Arc::new(GatedStore::default());
    let journal = Journal::new(Log::start(store.clone(), JOURNAL_PREFIX, "t", GroupCommit::default()));
    let from = rtp_durability::clock::now() - ChronoDuration::minutes(1);
    let shared = Arc::new(SharedIndex::default());
    store.armed.store(true, Ordering::SeqCst);
    let r = {
        let (shared, journal) = (shared.clone(), journal.clone());
        tokio::spawn(async move { shared.refresh(&journal, from, SHARED_INDEX_MAX_IDS).await })
    };
    store.in_list.notified().await;
    journal.append(&success("paid")).await.unwrap();
    let c = {
        let (shared, journal) = (shared.clone(), journal.clone());
        tokio::spawn(async move {
            shared.refresh(&journal, from, SHARED_INDEX_MAX_IDS).await.unwrap();
            shared.index.lock().await.known("paid")
        })
    };
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
    store.release.notify_one();
    r.await.unwrap().unwrap();
    assert!(c.await.unwrap().is_some());
}

async fn redis() -> RedisLedger {
    let url = std::env::var("RTPD_TEST_REDIS_URL").expect("RTPD_TEST_REDIS_URL");
    let l = RedisLedger::connect(&RedisSettings {
        url: url.as_str().into(),
        key_prefix: format!("t-{}", uuid::Uuid::new_v4().simple()),
        entra: false,
        client_id: None,
        retention: None,
        timeout: DEFAULT_TIMEOUT,
    })
    .unwrap();
    rtp_durability::ledger::mark_new(&l).await.unwrap();
    l
}

fn reg(id: &str) -> Registration {
    Registration {
        transaction_id: TransactionId::parse(id).unwrap(),
        sha256: "aa".into(),
        wal_ref: "w#0+1".parse().unwrap(),
        vendor: None,
        received_at: rtp_durability::clock::now(),
        expires_at: None,
    }
}

/// 8358832 left REPLAY on the caller's clock: a replay made by a process
/// (API / rtpd replay) whose clock runs ahead of Redis by more than the
/// quiet window resets a LIVE claim (lease compared with the caller's now)
/// and leaves it due at once: a second claim while the first call runs.
#[tokio::test]
async fn redis_replay_on_a_clock_ahead_resets_a_live_claim() {
    let l = redis().await;
    l.register(reg("rp-1")).await.unwrap();
    let ClaimOutcome::Claimed(c) = l.claim("rp-1", "w1", Duration::from_secs(30)).await.unwrap() else {
        panic!()
    };
    // The replaying process's clock runs 90 s ahead of the server's.
    rtp_durability::clock::simulate(Utc::now() + ChronoDuration::seconds(90), 1);
    let out = l.replay("rp-1", "n1", false, Duration::from_secs(30)).await.unwrap();
    assert!(
        matches!(out, ReplayOutcome::Refused(_)),
        "unforced replay of a claim whose lease runs to {:?} (server clock) was accepted: {out:?}",
        c.lease_until
    );
}

/// Same class, settle side: the replay quiet window after a failed
/// (timed-out) attempt is measured from `updated_at`, written on the
/// settler's clock, and CLAIM compares it with the server's: a settler a
/// minute behind makes the replayed transaction claimable at once.
#[tokio::test]
async fn redis_replay_quiet_window_after_a_settle_on_a_clock_behind() {
    let l = redis().await;
    rtp_durability::clock::simulate(Utc::now() - ChronoDuration::minutes(1), 1);
    l.register(reg("rp-2")).await.unwrap();
    l.claim("rp-2", "w1", Duration::from_secs(30)).await.unwrap();
    l.settle(
        "rp-2",
        "w1",
        1,
        Settlement::Failed {
            error: "timed out".into(),
            next_retry_at: rtp_durability::clock::now() + ChronoDuration::seconds(20),
        },
    )
    .await
    .unwrap();
    let out = l.replay("rp-2", "n2", false, Duration::from_secs(30)).await.unwrap();
    assert!(matches!(out, ReplayOutcome::Reset(_)), "{out:?}");
    let got = l.claim("rp-2", "w2", Duration::from_secs(30)).await.unwrap();
    assert!(
        matches!(got, ClaimOutcome::NotDue(_)),
        "a replay right after a timed-out attempt was claimable at once: {got:?}"
    );
}

/// PostgreSQL compares leases with the caller's clock: a processor whose
/// clock runs 40 s ahead takes over a 30 s lease another processor took a
/// moment ago (both calls in flight).
#[tokio::test]
async fn postgres_claim_takes_over_a_live_lease_on_a_clock_ahead() {
    use rtp_durability::ledger::postgres::{DEFAULT_POOL_SIZE, PostgresLedger, PostgresSettings};
    let url = std::env::var("RTPD_TEST_POSTGRES_URL").expect("RTPD_TEST_POSTGRES_URL");
    let l = PostgresLedger::connect(&PostgresSettings {
        url: url.into(),
        entra: false,
        client_id: None,
        retention: None,
        timeout: Duration::from_secs(5),
        pool_size: DEFAULT_POOL_SIZE,
        payload: false,
    })
    .unwrap();
    rtp_durability::ledger::mark_new(&l).await.unwrap();
    let id = format!("skew-{}", uuid::Uuid::new_v4().simple());
    l.register(reg(&id)).await.unwrap();
    assert!(matches!(
        l.claim(&id, "w1", Duration::from_secs(30)).await.unwrap(),
        ClaimOutcome::Claimed(_)
    ));
    rtp_durability::clock::simulate(Utc::now() + ChronoDuration::seconds(40), 1);
    let got = l.claim(&id, "w2", Duration::from_secs(30)).await.unwrap();
    assert!(
        matches!(got, ClaimOutcome::Busy(_)),
        "w2 (clock 40 s ahead) took over w1's live 30 s lease: {got:?}"
    );
}
