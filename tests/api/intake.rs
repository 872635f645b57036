//! The central guarantee at the layer every way in shares, without a socket:
//! `Intake::accept` answers `Accepted` only once the record is durable in the
//! WAL and registered; a WAL it cannot write means nothing is registered or
//! enqueued; a failed send still leaves a durable, registered transaction.
//! Real embedded adapters (local WAL directory, SQLite ledger and queue); a
//! wrapper injects the failures.

use async_trait::async_trait;
use bytes::Bytes;
use rtp_durability::intake::{Dependency, Intake, IntakeError, IntakeOutcome, Submission};
use rtp_durability::ledger::local::LocalLedger;
use rtp_durability::queue::{
    OutgoingMessage, Queue, QueueError, ReceivedMessage,
    local::{LocalQueue, LocalQueueOptions},
};
use rtp_durability::replay::load_record;
use rtp_durability::transaction::{Sha256, State, TransactionId};
use rtp_durability::wal::{
    GroupCommit, Log, Source, WAL_PREFIX,
    local::LocalStore,
    store::{ObjectInfo, ObjectStore, PutOptions, StoreError},
};
use std::sync::{
    Arc,
    atomic::{AtomicBool, Ordering},
};
use std::time::Duration;

/// The local store, refusing writes while `down` is set.
struct Flaky {
    inner: LocalStore,
    down: AtomicBool,
}

#[async_trait]
impl ObjectStore for Flaky {
    async fn put_new(&self, key: &str, body: Bytes, opts: &PutOptions) -> Result<(), StoreError> {
        if self.down.load(Ordering::SeqCst) {
            return Err(StoreError::Unavailable("injected outage".into()));
        }
        self.inner.put_new(key, body, opts).await
    }
    async fn get(&self, key: &str) -> Result<Bytes, StoreError> {
        self.inner.get(key).await
    }
    async fn get_range(&self, key: &str, offset: u64, len: u64) -> Result<Bytes, StoreError> {
        self.inner.get_range(key, offset, len).await
    }
    async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>, StoreError> {
        self.inner.list(prefix).await
    }
    async fn ping(&self) -> Result<(), StoreError> {
        self.inner.ping().await
    }
    fn describe(&self) -> String {
        "flaky local store".into()
    }
}

/// The local queue, refusing sends while `down` is set.
struct FlakyQueue {
    inner: LocalQueue,
    down: AtomicBool,
    /// Sends do not answer while set (a broker gone mid-send).
    hang: AtomicBool,
}

#[async_trait]
impl Queue for FlakyQueue {
    async fn send(&self, messages: Vec<OutgoingMessage>) -> Result<(), QueueError> {
        if self.down.load(Ordering::SeqCst) {
            return Err(QueueError::Unavailable("injected outage".into()));
        }
        // Not answering until `hang` is cleared.
        while self.hang.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.inner.send(messages).await
    }
    async fn receive(
        &self,
        max: usize,
        wait: Duration,
    ) -> Result<Vec<ReceivedMessage>, QueueError> {
        self.inner.receive(max, wait).await
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
        self.inner.complete(m).await
    }
    async fn abandon(&self, m: &ReceivedMessage) -> Result<(), QueueError> {
        self.inner.abandon(m).await
    }
    async fn dead_letter(
        &self,
        m: &ReceivedMessage,
        reason: &str,
        description: &str,
    ) -> Result<(), QueueError> {
        self.inner.dead_letter(m, reason, description).await
    }
    async fn renew_lock(
        &self,
        m: &ReceivedMessage,
    ) -> Result<chrono::DateTime<chrono::Utc>, QueueError> {
        self.inner.renew_lock(m).await
    }
    async fn ping(&self) -> Result<(), QueueError> {
        self.inner.ping().await
    }
    fn describe(&self) -> String {
        "flaky local queue".into()
    }
}

struct Rig {
    intake: Intake,
    store: Arc<Flaky>,
    queue: Arc<FlakyQueue>,
    _dir: tempfile::TempDir,
}

fn rig() -> Rig {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Flaky {
        inner: LocalStore::open(dir.path().join("objects")).unwrap(),
        down: AtomicBool::new(false),
    });
    let queue = Arc::new(FlakyQueue {
        inner: LocalQueue::open(&dir.path().join("queue.db"), LocalQueueOptions::default())
            .unwrap(),
        down: AtomicBool::new(false),
        hang: AtomicBool::new(false),
    });
    let gc = GroupCommit {
        retry_deadline: Duration::from_millis(200),
        ..GroupCommit::default()
    };
    let intake = Intake {
        wal: Log::start(store.clone(), WAL_PREFIX, "intake-test", gc.clone()),
        journal: rtp_durability::journal::Journal::new(Log::start(
            store.clone(),
            rtp_durability::wal::JOURNAL_PREFIX,
            "intake-test",
            gc,
        )),
        ledger: {
            let l = LocalLedger::open(&dir.path().join("ledger.db")).unwrap();
            // Nothing was in it before: marked as a rebuild over an empty WAL would.
            futures::executor::block_on(rtp_durability::ledger::mark_new(&l)).unwrap();
            Arc::new(l)
        },
        queue: queue.clone(),
        resend: None,
        ledger_lost: Default::default(),
    };
    Rig {
        intake,
        store,
        queue,
        _dir: dir,
    }
}

fn submission(id: &str, body: &str) -> Submission {
    Submission {
        transaction_id: TransactionId::parse(id).unwrap(),
        payload: Bytes::from(body.to_owned()),
        sha256: Sha256::of(body.as_bytes()),
        source: Source {
            vendor: Some("acme".into()),
            remote_addr: None,
            kafka: None,
        },
        expires_at: None,
    }
}

async fn queued(q: &FlakyQueue) -> Vec<String> {
    let got = q
        .inner
        .receive(10, Duration::from_millis(200))
        .await
        .unwrap();
    got.iter().map(|m| m.message_id.clone()).collect()
}

#[tokio::test]
async fn accepted_means_durable_registered_and_enqueued() {
    let r = rig();
    let body = r#"{"transaction_id":"IN-1","amount":"1.00"}"#;
    let IntakeOutcome::Accepted { record, enqueued } =
        r.intake.accept(submission("IN-1", body)).await.unwrap()
    else {
        panic!("a new transaction is accepted")
    };
    assert!(enqueued);
    assert_eq!(record.status, State::Pending);
    let wal = load_record(&r.intake.wal, &record.wal_ref).await.unwrap();
    assert_eq!(wal.payload.as_bytes(), body.as_bytes(), "byte-identical");
    assert_eq!(wal.sha256, Sha256::of(body.as_bytes()));
    let held = r.intake.ledger.get("acme/IN-1").await.unwrap().unwrap();
    assert_eq!(held.wal_ref, record.wal_ref);
    // The message id is the vendor-scoped key.
    assert_eq!(queued(&r.queue).await, ["acme/IN-1"]);
}

#[tokio::test]
async fn same_bytes_is_a_duplicate_and_other_bytes_a_conflict_with_nothing_written() {
    let r = rig();
    let body = r#"{"transaction_id":"IN-2"}"#;
    r.intake.accept(submission("IN-2", body)).await.unwrap();
    assert!(matches!(
        r.intake.accept(submission("IN-2", body)).await.unwrap(),
        IntakeOutcome::Duplicate(_)
    ));
    let IntakeOutcome::Conflict(existing) = r
        .intake
        .accept(submission("IN-2", r#"{"transaction_id":"IN-2","x":1}"#))
        .await
        .unwrap()
    else {
        panic!("other bytes under the same id conflict")
    };
    assert_eq!(
        existing.sha256,
        Sha256::of(body.as_bytes()),
        "never overwritten"
    );
    assert_eq!(queued(&r.queue).await, ["acme/IN-2"], "enqueued once");
}

#[tokio::test]
async fn a_wal_that_cannot_be_written_registers_and_enqueues_nothing() {
    let r = rig();
    r.store.down.store(true, Ordering::SeqCst);
    let err = r
        .intake
        .accept(submission("IN-3", r#"{"transaction_id":"IN-3"}"#))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            IntakeError::Unavailable {
                dependency: Dependency::Wal,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(r.intake.ledger.get("acme/IN-3").await.unwrap().is_none());
    assert!(queued(&r.queue).await.is_empty());
    // Once the WAL is back the same submission is accepted.
    r.store.down.store(false, Ordering::SeqCst);
    assert!(matches!(
        r.intake
            .accept(submission("IN-3", r#"{"transaction_id":"IN-3"}"#))
            .await
            .unwrap(),
        IntakeOutcome::Accepted { enqueued: true, .. }
    ));
}

#[tokio::test]
async fn a_failed_send_still_leaves_a_durable_pending_transaction() {
    let r = rig();
    r.queue.down.store(true, Ordering::SeqCst);
    let body = r#"{"transaction_id":"IN-4"}"#;
    let IntakeOutcome::Accepted { record, enqueued } =
        r.intake.accept(submission("IN-4", body)).await.unwrap()
    else {
        panic!("durable and registered: accepted")
    };
    assert!(!enqueued, "the reconciler re-drives it");
    assert_eq!(
        r.intake
            .ledger
            .get("acme/IN-4")
            .await
            .unwrap()
            .unwrap()
            .status,
        State::Pending
    );
    let wal = load_record(&r.intake.wal, &record.wal_ref).await.unwrap();
    assert_eq!(wal.payload, body);
}

/// Issue 22 (CI, Redis killed mid-backlog): a registration that landed but
/// whose answer was lost left the transaction `pending` with nothing sent —
/// the vendor got a 503. Its retry of the same bytes sends the message, so
/// the transaction does not wait minutes for the reconciler's pending
/// threshold; a duplicate of one already sent sends nothing more (the same
/// message id), and one no longer pending sends nothing.
#[tokio::test]
async fn a_retried_post_of_a_pending_transaction_sends_what_the_first_did_not() {
    let r = rig();
    let body = r#"{"transaction_id":"IN-13"}"#;
    r.queue.down.store(true, Ordering::SeqCst);
    let IntakeOutcome::Accepted {
        enqueued: false, ..
    } = r.intake.accept(submission("IN-13", body)).await.unwrap()
    else {
        panic!("registered, not sent")
    };
    r.queue.down.store(false, Ordering::SeqCst);
    assert!(queued(&r.queue).await.is_empty(), "nothing sent yet");
    let IntakeOutcome::Duplicate(rec) = r.intake.accept(submission("IN-13", body)).await.unwrap()
    else {
        panic!("the same bytes again are a duplicate")
    };
    assert_eq!(rec.status, State::Pending);
    let got = r
        .queue
        .inner
        .receive(10, Duration::from_millis(200))
        .await
        .unwrap();
    let ids: Vec<_> = got.iter().map(|m| m.message_id.as_str()).collect();
    assert_eq!(ids, ["acme/IN-13"], "the retry sent the initial message");
    assert_eq!(&got[0].body[..], body.as_bytes(), "with the vendor's bytes");

    // Sent once already (the message is in the queue, or was consumed within
    // the duplicate-detection window): another retry adds no message.
    r.intake.accept(submission("IN-13", body)).await.unwrap();
    r.queue.inner.abandon(&got[0]).await.unwrap();
    assert_eq!(queued(&r.queue).await, ["acme/IN-13"], "still one message");

    // Finished: a retry sends nothing.
    let done = r#"{"transaction_id":"IN-14"}"#;
    r.queue.down.store(true, Ordering::SeqCst);
    r.intake.accept(submission("IN-14", done)).await.unwrap();
    r.queue.down.store(false, Ordering::SeqCst);
    let ledger = &r.intake.ledger;
    let owner = "test-worker";
    let rtp_durability::ledger::ClaimOutcome::Claimed(c) = ledger
        .claim("acme/IN-14", owner, Duration::from_secs(30))
        .await
        .unwrap()
    else {
        panic!("claimable")
    };
    ledger
        .settle(
            "acme/IN-14",
            owner,
            c.attempts,
            rtp_durability::transaction::Settlement::Success,
        )
        .await
        .unwrap();
    r.intake.accept(submission("IN-14", done)).await.unwrap();
    assert!(
        !queued(&r.queue).await.contains(&"acme/IN-14".to_string()),
        "a finished transaction is not sent again"
    );
}

/// Issue 22: a send that fails after the ledger write is retried from the
/// in-process resend queue as soon as the queue answers again, with the
/// message id of the first send (duplicate detection drops it if that one
/// landed after all), not minutes later by the reconciler.
#[tokio::test]
async fn a_failed_send_is_resent_as_soon_as_the_queue_answers() {
    let mut r = rig();
    let waiting = Arc::new(rtp_durability::recovery::Waiting::default());
    let resend = rtp_durability::resend::Resend::start(r.queue.clone(), waiting.clone(), 10);
    r.intake.resend = Some(resend.clone());
    r.queue.down.store(true, Ordering::SeqCst);
    let body = r#"{"transaction_id":"IN-5"}"#;
    let IntakeOutcome::Accepted { enqueued, .. } =
        r.intake.accept(submission("IN-5", body)).await.unwrap()
    else {
        panic!("durable and registered: accepted")
    };
    assert!(!enqueued);
    assert_eq!(resend.len(), 1, "held for resending");
    assert_eq!(waiting.snapshot().0, 1, "counted as waiting on recovery");
    assert!(
        r.queue
            .receive(1, Duration::from_millis(300))
            .await
            .unwrap()
            .is_empty(),
        "nothing reached the queue while it was down"
    );
    r.queue.down.store(false, Ordering::SeqCst);
    let got = r.queue.receive(1, Duration::from_secs(15)).await.unwrap();
    assert_eq!(got.len(), 1, "resent once the queue answered");
    assert_eq!(
        got[0].message_id, "acme/IN-5",
        "the first send's id: the key"
    );
    assert_eq!(&got[0].body[..], body.as_bytes());
    r.queue.complete(&got[0]).await.unwrap();
    assert!(resend.is_empty());
    assert_eq!(waiting.snapshot().0, 0);
}

/// A send that never answers (the broker went away mid-send) does not hold
/// the vendor's request: intake stops waiting after its own bound
/// (`INGEST_SEND_WAIT`), answers `Accepted` with `enqueued: false` (the
/// record is durable and `pending`) and hands the message to the resend
/// queue, which delivers it once the queue answers.
#[tokio::test]
async fn a_send_that_never_answers_is_left_to_the_resend_queue() {
    let mut r = rig();
    let waiting = Arc::new(rtp_durability::recovery::Waiting::default());
    let resend = rtp_durability::resend::Resend::start(r.queue.clone(), waiting.clone(), 10);
    r.intake.resend = Some(resend.clone());
    r.queue.hang.store(true, Ordering::SeqCst);
    let body = r#"{"transaction_id":"IN-HANG"}"#;
    // Only a guard against hanging forever; the bound itself is 5 s.
    let outcome = tokio::time::timeout(
        Duration::from_secs(60),
        r.intake.accept(submission("IN-HANG", body)),
    )
    .await
    .expect("intake answered although the send never did")
    .unwrap();
    let IntakeOutcome::Accepted { record, enqueued } = outcome else {
        panic!("durable and registered: accepted, got {outcome:?}")
    };
    assert!(!enqueued, "the send did not go through: enqueued is false");
    assert_eq!(record.status, State::Pending);
    assert_eq!(waiting.snapshot().0, 1, "counted as waiting on recovery");
    r.queue.hang.store(false, Ordering::SeqCst);
    let got = r.queue.receive(1, Duration::from_secs(15)).await.unwrap();
    assert_eq!(got.len(), 1, "resent once the queue answered");
    assert_eq!(got[0].message_id, "acme/IN-HANG");
    assert_eq!(&got[0].body[..], body.as_bytes());
}

/// One message the queue refuses for good (`message-size-exceeded`, a fatal
/// error) does not sit at the head of the resend queue retried forever: it
/// is dropped (the transaction stays `pending` for the reconciler) and the
/// messages behind it are resent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_resend_queue_is_not_blocked_by_a_message_the_queue_refuses() {
    /// The local queue, refusing for good any message whose id starts with TOO-BIG.
    struct Refusing(LocalQueue);
    #[async_trait]
    impl Queue for Refusing {
        async fn send(&self, m: Vec<OutgoingMessage>) -> Result<(), QueueError> {
            if m.iter().any(|m| m.message_id.starts_with("TOO-BIG")) {
                return Err(QueueError::Fatal("message-size-exceeded".into()));
            }
            self.0.send(m).await
        }
        async fn receive(
            &self,
            max: usize,
            wait: Duration,
        ) -> Result<Vec<ReceivedMessage>, QueueError> {
            self.0.receive(max, wait).await
        }
        async fn receive_dead_letters(
            &self,
            max: usize,
            wait: Duration,
        ) -> Result<Vec<ReceivedMessage>, QueueError> {
            self.0.receive_dead_letters(max, wait).await
        }
        async fn peek_dead_letters(
            &self,
            from: i64,
            max: usize,
        ) -> Result<Vec<ReceivedMessage>, QueueError> {
            self.0.peek_dead_letters(from, max).await
        }
        async fn complete(&self, m: &ReceivedMessage) -> Result<(), QueueError> {
            self.0.complete(m).await
        }
        async fn abandon(&self, m: &ReceivedMessage) -> Result<(), QueueError> {
            self.0.abandon(m).await
        }
        async fn dead_letter(
            &self,
            m: &ReceivedMessage,
            r: &str,
            d: &str,
        ) -> Result<(), QueueError> {
            self.0.dead_letter(m, r, d).await
        }
        async fn renew_lock(
            &self,
            m: &ReceivedMessage,
        ) -> Result<chrono::DateTime<chrono::Utc>, QueueError> {
            self.0.renew_lock(m).await
        }
        async fn ping(&self) -> Result<(), QueueError> {
            self.0.ping().await
        }
        fn describe(&self) -> String {
            "refusing".into()
        }
    }

    let dir = tempfile::tempdir().unwrap();
    let q = Arc::new(Refusing(
        LocalQueue::open(&dir.path().join("q.db"), LocalQueueOptions::default()).unwrap(),
    ));
    let waiting = Arc::new(rtp_durability::recovery::Waiting::default());
    let resend = rtp_durability::resend::Resend::start(q.clone(), waiting.clone(), 10_000);
    let msg = |id: &str| OutgoingMessage {
        message_id: id.into(),
        body: Bytes::from_static(b"{}"),
        content_type: Some("application/json".into()),
        properties: Default::default(),
        scheduled_enqueue_at: None,
    };
    // As a retry copy is handed over (on any error) ...
    assert!(resend.push("TOO-BIG", msg("TOO-BIG")));
    for i in 0..5 {
        assert!(resend.push(&format!("OK-{i}"), msg(&format!("OK-{i}"))));
    }
    let mut ids = Vec::new();
    while ids.len() < 5 {
        let got = q.receive(10, Duration::from_secs(15)).await.unwrap();
        assert!(
            !got.is_empty(),
            "the messages behind the refused one are resent (got {ids:?}; {} still held)",
            resend.len()
        );
        for m in got {
            ids.push(m.message_id.clone());
            q.complete(&m).await.unwrap();
        }
    }
    ids.sort();
    assert_eq!(ids, ["OK-0", "OK-1", "OK-2", "OK-3", "OK-4"]);
    assert!(resend.is_empty(), "the refused message is not kept");
    assert_eq!(waiting.snapshot().0, 0, "nothing counted as waiting");
    // ... while intake's send error is looked at first: a permanent
    // refusal is not queued at all.
    assert!(!resend.push_failed(
        "TOO-BIG-2",
        msg("TOO-BIG-2"),
        &QueueError::Fatal("message-size-exceeded".into())
    ));
    assert!(resend.is_empty());
    assert!(resend.push_failed("OK-5", msg("OK-5"), &QueueError::Unavailable("down".into())));
}

/// Review of the duplicate resend: a vendor retrying a pending transaction
/// while the queue does not answer neither waits for the ingest send bound
/// (5 s) on every retry nor fills the resend queue with one copy per retry —
/// the resend queue holds one message per message id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_of_a_pending_transaction_while_the_queue_hangs_hold_one_resend() {
    let mut r = rig();
    let waiting = Arc::new(rtp_durability::recovery::Waiting::default());
    let resend = rtp_durability::resend::Resend::start(r.queue.clone(), waiting.clone(), 10);
    r.intake.resend = Some(resend.clone());
    let body = r#"{"transaction_id":"IN-DUPS"}"#;
    r.queue.down.store(true, Ordering::SeqCst);
    let IntakeOutcome::Accepted {
        enqueued: false, ..
    } = r.intake.accept(submission("IN-DUPS", body)).await.unwrap()
    else {
        panic!("registered, not sent")
    };
    r.queue.down.store(false, Ordering::SeqCst);
    r.queue.hang.store(true, Ordering::SeqCst);
    for _ in 0..5 {
        let started = std::time::Instant::now();
        let outcome = tokio::time::timeout(
            Duration::from_secs(60),
            r.intake.accept(submission("IN-DUPS", body)),
        )
        .await
        .expect("a duplicate is answered although the send never is")
        .unwrap();
        assert!(matches!(outcome, IntakeOutcome::Duplicate(_)));
        assert!(
            started.elapsed() < rtp_durability::intake::INGEST_SEND_WAIT,
            "a duplicate does not wait out the ingest send bound: {:?}",
            started.elapsed()
        );
    }
    assert_eq!(resend.len(), 1, "one waiting copy per message id");
    assert_eq!(waiting.snapshot().0, 1);
    r.queue.hang.store(false, Ordering::SeqCst);
    let got = r.queue.receive(10, Duration::from_secs(15)).await.unwrap();
    let ids: Vec<_> = got.iter().map(|m| m.message_id.as_str()).collect();
    assert_eq!(ids, ["acme/IN-DUPS"], "sent once the queue answered");
}
