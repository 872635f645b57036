//! Recovery paths of the reconciler (issue 12), against the real pipeline.

use crate::processor_faults::{On, app_on};
use crate::support::{AppOptions, TestApp, VENDOR, key};
use async_trait::async_trait;
use chrono::{Duration as ChronoDuration, Utc};
use rtp_durability::journal::{EntryKind, JournalEntry};
use rtp_durability::ledger::local::LocalLedger;
use rtp_durability::ledger::redis::{RedisLedger, RedisSettings};
use rtp_durability::ledger::{
    ClaimOutcome, Counts, Ledger, LedgerError, ListQuery, Page, RegisterOutcome, ReplayOutcome,
};
use rtp_durability::reconcile::{ReconcileOptions, ReconcileReport, Reconciler};
use rtp_durability::replay::{Operator, ReplayRequest, Replayed, Replayer};
use rtp_durability::transaction::{Registration, Settlement, TxRecord};
use rtp_durability::transaction::{Sha256, State, TransactionId, WalRef};
use rtp_durability::wal::{Source, WalRecord};
use serde_json::json;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

/// Takes every message off the queue: the queue lost them.
async fn lose_queue_messages(app: &TestApp) {
    loop {
        let got = app
            .services
            .queue
            .receive(10, Duration::from_millis(300))
            .await
            .unwrap();
        if got.is_empty() {
            return;
        }
        for m in got {
            app.services.queue.complete(&m).await.unwrap();
        }
    }
}

/// Issue 12 item 2: when one id has several WAL records (a refused re-POST
/// with other bytes came first), the reconciler matches the record whose
/// sha256 the ledger holds, and re-drives it.
async fn reconciler_matches_wal_record_by_sha(on: On) {
    let app = app_on(on, AppOptions::default()).await;
    let id = "MS-1";
    // A WAL record of other bytes for the same id, earlier in the WAL.
    let refused = r#"{"transaction_id":"MS-1","amount":"999.00"}"#;
    app.services
        .wal
        .append_json(
            &WalRecord {
                v: 1,
                transaction_id: TransactionId::parse(id).unwrap(),
                received_at: Utc::now(),
                // The same vendor's refused re-POST: same key `<vendor>/<id>`.
                source: Source {
                    vendor: Some(VENDOR.into()),
                    ..Default::default()
                },
                sha256: Sha256::of(refused.as_bytes()),
                payload: refused.into(),
                expires_at: None,
                trace_parent: None,
            },
            Utc::now(),
        )
        .await
        .unwrap();
    let r = app
        .post_json(&json!({"transaction_id": id, "amount": "1.00"}))
        .await;
    assert_eq!(r.status(), 202);
    let accepted = app.record(id).await.sha256;
    lose_queue_messages(&app).await;

    let now = Utc::now();
    let o = ReconcileOptions::new(now - ChronoDuration::minutes(5), now, Duration::ZERO);
    let report = app.services.reconciler().reconcile(&o).await.unwrap();
    assert_eq!(report.conflicting, 1, "{report:?}");
    assert_eq!(report.redriven_pending, 1, "{report:?}");
    app.drain_until_terminal(&[id]).await;
    let rec = app.record(id).await;
    assert_eq!(rec.status, State::Success);
    assert_eq!(rec.sha256, accepted);
    let calls = app.mock_calls().await;
    assert_eq!(calls["by_key"][key(id).as_str()]["calls"], 1, "{calls}");
}

#[tokio::test]
async fn reconciler_matches_wal_record_by_sha_sqlite() {
    reconciler_matches_wal_record_by_sha(On::Sqlite).await
}

#[tokio::test]
async fn reconciler_matches_wal_record_by_sha_redis() {
    reconciler_matches_wal_record_by_sha(On::Redis).await
}

/// Issue 12 item 3: a replayed transaction older than the reconciler's WAL
/// window, whose replay message was lost, is still re-driven: the
/// reconciler walks the ledger's non-terminal states whatever their age.
async fn old_replayed_pending_is_redriven(on: On) {
    let app = app_on(on, AppOptions::default()).await;
    let id = "OLD-1";
    app.post_json(&json!({"transaction_id": id, "_mock": {"script": ["400", "ok"]}}))
        .await;
    app.drain_until_terminal(&[id]).await;
    assert_eq!(app.state_of(id).await, State::DeadLetter);
    let r = app
        .admin_post(&format!("/v1/transactions/{id}/replay"), None)
        .await;
    assert!(r.status().is_success());
    lose_queue_messages(&app).await;
    // The replay is due once its last attempt's call can have ended (one
    // downstream timeout after it); before, its own scheduled copy is all
    // it needs.
    let due = app.record(id).await.next_retry_at;
    if let Some(due) = due {
        let wait = (due - Utc::now()).to_std().unwrap_or_default();
        tokio::time::sleep(wait + Duration::from_millis(50)).await;
    }
    // A window that starts after the transaction was received (the watermark
    // moved past it long ago).
    let now = Utc::now();
    let o = ReconcileOptions::new(
        now + ChronoDuration::seconds(1),
        now + ChronoDuration::minutes(1),
        Duration::ZERO,
    );
    let report = app.services.reconciler().reconcile(&o).await.unwrap();
    assert_eq!(report.redriven_pending, 1, "{report:?}");
    assert_eq!(
        report.actions,
        vec![format!(
            "{}: pending, outside the WAL window (re-drive)",
            key(id)
        )]
    );
    app.drain_until_terminal(&[id]).await;
    assert_eq!(app.state_of(id).await, State::Success);
    assert_eq!(
        app.mock_calls().await["by_key"][key(id).as_str()]["calls"],
        2
    );
}

#[tokio::test]
async fn old_replayed_pending_is_redriven_outside_the_wal_window_sqlite() {
    old_replayed_pending_is_redriven(On::Sqlite).await
}

#[tokio::test]
async fn old_replayed_pending_is_redriven_outside_the_wal_window_redis() {
    old_replayed_pending_is_redriven(On::Redis).await
}

/// An empty ledger of the same kind as the app's (a lost one, to rebuild into).
fn fresh_ledger(app: &TestApp, on: On) -> Arc<dyn Ledger> {
    match on {
        On::Redis => {
            let mut s = app.services.settings.clone();
            s.redis_key_prefix = crate::support::redis_key_prefix();
            Arc::new(RedisLedger::connect(&RedisSettings::from_settings(&s)).unwrap())
        }
        _ => Arc::new(LocalLedger::open(&app.data_dir().join("rebuilt-ledger.db")).unwrap()),
    }
}

/// `rtpd rebuild-ledger`'s pass (the reconciler's join, re-driving off) into `ledger`.
async fn rebuild_into(app: &TestApp, ledger: Arc<dyn Ledger>) -> ReconcileReport {
    let r = Reconciler {
        ledger,
        ..app.services.reconciler()
    };
    let now = Utc::now();
    let mut o = ReconcileOptions::new(now - ChronoDuration::minutes(5), now, Duration::ZERO);
    o.redrive = false;
    r.reconcile(&o).await.unwrap()
}

/// A WAL record of `body` under `id`, as ingest writes one.
async fn wal_record(app: &TestApp, id: &str, body: &str) -> WalRef {
    app.services
        .wal
        .append_json(
            &WalRecord {
                v: 1,
                transaction_id: TransactionId::parse(id).unwrap(),
                received_at: Utc::now(),
                source: Source {
                    vendor: Some(VENDOR.into()),
                    ..Default::default()
                },
                sha256: Sha256::of(body.as_bytes()),
                payload: body.into(),
                expires_at: None,
                trace_parent: None,
            },
            Utc::now(),
        )
        .await
        .unwrap()
}

/// Intake's note of a 409 answered for a payload already in the WAL.
async fn refusal_noted(app: &TestApp, id: &str, body: &str) {
    app.services
        .journal
        .append(&JournalEntry {
            v: 1,
            kind: EntryKind::Refused,
            transaction_id: key(id),
            at: Utc::now(),
            attempt: None,
            state: State::Pending,
            error: None,
            next_retry_at: None,
            actor: "intake".into(),
            reason: None,
            sha256: Some(Sha256::of(body.as_bytes())),
            wal_ref: None,
            replay_nonce: None,
            latency_ms: None,
        })
        .await
        .unwrap();
}

/// Issue 12 item 2, rebuild half: after a ledger loss, an id with several
/// WAL records comes back as the record the journal's attempts name, not
/// the first one in the WAL (here a refused payload that came first), and
/// finished: nothing runs again.
async fn rebuild_prefers_the_wal_record_the_journal_confirms(on: On) {
    let app = app_on(on, AppOptions::default()).await;
    let id = "RB-1";
    let refused = r#"{"transaction_id":"RB-1","amount":"999.00"}"#;
    wal_record(&app, id, refused).await;
    let r = app
        .post_json(&json!({"transaction_id": id, "amount": "1.00"}))
        .await;
    assert_eq!(r.status(), 202);
    app.drain_until_terminal(&[id]).await;
    let accepted = app.record(id).await;
    assert_eq!(accepted.status, State::Success);

    let rebuilt = fresh_ledger(&app, on);
    let report = rebuild_into(&app, rebuilt.clone()).await;
    let rec = rebuilt.get(&key(id)).await.unwrap().expect("restored");
    assert_eq!(rec.sha256, accepted.sha256, "{report:?}");
    assert_eq!(rec.wal_ref, accepted.wal_ref);
    assert_eq!(rec.status, State::Success);
    assert_eq!(report.restored_finished, 1, "{report:?}");
}

#[tokio::test]
async fn rebuild_prefers_the_wal_record_the_journal_confirms_sqlite() {
    rebuild_prefers_the_wal_record_the_journal_confirms(On::Sqlite).await
}

#[tokio::test]
async fn rebuild_prefers_the_wal_record_the_journal_confirms_redis() {
    rebuild_prefers_the_wal_record_the_journal_confirms(On::Redis).await
}

/// Issue 12 item 2, rebuild half: an unfinished transaction whose id has
/// several WAL records is rebuilt as the one the vendor was not refused,
/// whichever comes first — a payload answered 409 (noted in the journal
/// before the answer) before or after it, a payload answered 503 before the
/// vendor's re-POST — and a rebuild never restores a payload whose every
/// record was refused.
async fn rebuild_never_restores_a_refused_payload(on: On) {
    let app = app_on(on, AppOptions::default()).await;
    // Refused, then accepted.
    let (a1, r1) = ("RF-1", r#"{"transaction_id":"RF-1","v":"refused"}"#);
    wal_record(&app, a1, r1).await;
    refusal_noted(&app, a1, r1).await;
    // Accepted, then refused (a concurrent first POST that lost).
    let (a2, r2) = ("RF-2", r#"{"transaction_id":"RF-2","v":"refused"}"#);
    // 503 (its ledger step failed), then the vendor's re-POST with other bytes.
    let (a3, r3) = ("RF-3", r#"{"transaction_id":"RF-3","v":"503"}"#);
    wal_record(&app, a3, r3).await;
    let mut accepted = std::collections::BTreeMap::new();
    for id in [a1, a2, a3] {
        let r = app
            .post_json(&json!({"transaction_id": id, "v": "accepted"}))
            .await;
        assert_eq!(r.status(), 202);
        accepted.insert(id, app.record(id).await);
    }
    wal_record(&app, a2, r2).await;
    refusal_noted(&app, a2, r2).await;
    // Only ever refused: no record of it stands for a transaction.
    let (a4, r4) = ("RF-4", r#"{"transaction_id":"RF-4","v":"refused"}"#);
    wal_record(&app, a4, r4).await;
    refusal_noted(&app, a4, r4).await;
    lose_queue_messages(&app).await;

    let rebuilt = fresh_ledger(&app, on);
    let report = rebuild_into(&app, rebuilt.clone()).await;
    for (id, acc) in &accepted {
        let rec = rebuilt.get(&key(id)).await.unwrap().expect("restored");
        assert_eq!(rec.sha256, acc.sha256, "{id}: {report:?}");
        assert_eq!(rec.wal_ref, acc.wal_ref, "{id}");
        assert!(!rec.status.is_terminal(), "{id}: {rec:?}");
    }
    assert!(rebuilt.get(&key(a4)).await.unwrap().is_none(), "{report:?}");
    assert_eq!(report.missing_from_ledger, 3, "{report:?}");
}

#[tokio::test]
async fn rebuild_never_restores_a_refused_payload_sqlite() {
    rebuild_never_restores_a_refused_payload(On::Sqlite).await
}

#[tokio::test]
async fn rebuild_never_restores_a_refused_payload_redis() {
    rebuild_never_restores_a_refused_payload(On::Redis).await
}

/// The app's ledger, with an operator replay of one transaction slipped in
/// at its `n`th read (before or after the read): a replay made while a
/// reconcile pass runs.
struct ReplayDuringPass {
    inner: Arc<dyn Ledger>,
    replayer: Replayer,
    key: String,
    on_read: usize,
    after_read: bool,
    reads: AtomicUsize,
    replayed: AtomicBool,
}

impl ReplayDuringPass {
    async fn maybe_replay(&self) {
        if self.replayed.load(Ordering::SeqCst) {
            return;
        }
        self.replayed.store(true, Ordering::SeqCst);
        // Forced: its success is journaled, so a replay without force is
        // refused (simulation seed 693); the operator names the state seen.
        let req = ReplayRequest {
            force: true,
            operator: Operator::Cli("test".into()),
            reason: Some("the downstream lost it".into()),
            expect: Some(State::Processing),
        };
        let r = self.replayer.replay_one(&self.key, &req).await.unwrap();
        assert!(matches!(r, Replayed::Requeued { .. }), "{r:?}");
    }
}

#[async_trait]
impl Ledger for ReplayDuringPass {
    async fn register(&self, reg: Registration) -> Result<RegisterOutcome, LedgerError> {
        self.inner.register(reg).await
    }
    async fn get(&self, id: &str) -> Result<Option<TxRecord>, LedgerError> {
        let fire = id == self.key && self.reads.fetch_add(1, Ordering::SeqCst) + 1 == self.on_read;
        if fire && !self.after_read {
            self.maybe_replay().await;
        }
        let r = self.inner.get(id).await;
        if fire && self.after_read {
            self.maybe_replay().await;
        }
        r
    }
    async fn claim(
        &self,
        id: &str,
        owner: &str,
        lease: Duration,
    ) -> Result<ClaimOutcome, LedgerError> {
        self.inner.claim(id, owner, lease).await
    }
    async fn settle(
        &self,
        id: &str,
        owner: &str,
        attempt: u32,
        s: Settlement,
    ) -> Result<TxRecord, LedgerError> {
        self.inner.settle(id, owner, attempt, s).await
    }
    async fn replay_fate(&self, id: &str, nonce: &str) -> Result<Option<TxRecord>, LedgerError> {
        self.inner.replay_fate(id, nonce).await
    }
    async fn release(&self, id: &str, owner: &str, attempt: u32) -> Result<TxRecord, LedgerError> {
        self.inner.release(id, owner, attempt).await
    }
    async fn extend_lease(
        &self,
        id: &str,
        owner: &str,
        attempt: u32,
        lease: Duration,
    ) -> Result<TxRecord, LedgerError> {
        self.inner.extend_lease(id, owner, attempt, lease).await
    }
    async fn replay(
        &self,
        id: &str,
        nonce: &str,
        force: bool,
        quiet: Duration,
    ) -> Result<ReplayOutcome, LedgerError> {
        self.inner.replay(id, nonce, force, quiet).await
    }
    async fn restore(&self, rec: TxRecord) -> Result<(), LedgerError> {
        self.inner.restore(rec).await
    }
    async fn restore_missing(&self, rec: TxRecord) -> Result<bool, LedgerError> {
        self.inner.restore_missing(rec).await
    }
    async fn restore_if_unchanged(
        &self,
        seen: &TxRecord,
        rec: TxRecord,
    ) -> Result<bool, LedgerError> {
        self.inner.restore_if_unchanged(seen, rec).await
    }
    async fn try_lease(&self, name: &str, owner: &str, ttl: Duration) -> Result<bool, LedgerError> {
        self.inner.try_lease(name, owner, ttl).await
    }
    async fn checkpoint(&self, name: &str) -> Result<Option<String>, LedgerError> {
        self.inner.checkpoint(name).await
    }
    async fn set_checkpoint(&self, name: &str, value: &str) -> Result<(), LedgerError> {
        self.inner.set_checkpoint(name, value).await
    }
    async fn list(&self, q: ListQuery) -> Result<Page, LedgerError> {
        self.inner.list(q).await
    }
    async fn counts(&self) -> Result<Counts, LedgerError> {
        self.inner.counts().await
    }
    async fn oldest_update(
        &self,
        state: State,
    ) -> Result<Option<chrono::DateTime<Utc>>, LedgerError> {
        self.inner.oldest_update(state).await
    }
    async fn ping(&self) -> Result<(), LedgerError> {
        self.inner.ping().await
    }
    fn describe(&self) -> String {
        "ledger with a replay during the pass".into()
    }
    async fn intact(&self) -> Result<bool, LedgerError> {
        self.inner.intact().await
    }
    async fn begin_rebuild(&self, token: &str) -> Result<(), LedgerError> {
        self.inner.begin_rebuild(token).await
    }
    async fn mark_intact(&self, token: &str) -> Result<bool, LedgerError> {
        self.inner.mark_intact(token).await
    }
    async fn refused_while_lost(
        &self,
        id: &str,
        wal_refs: &[String],
    ) -> Result<Vec<String>, LedgerError> {
        self.inner.refused_while_lost(id, wal_refs).await
    }
}

/// Issue 12 item 8: a transaction whose ledger entry is behind the journal
/// (a success journaled, the settle lost) is replayed by an operator while
/// a reconcile pass runs — after the pass read the journal, before or while
/// it reads and corrects the ledger. The correction never undoes the
/// replay: the pass reads the journal and the ledger again before
/// correcting, and puts the correction only over the version it read
/// (`Ledger::restore_if_unchanged`). The replay (forced: a replay without
/// force of a transaction whose success is journaled is refused) then runs.
async fn correct_never_undoes_a_replay_made_during_the_pass(
    on: On,
    on_read: usize,
    after_read: bool,
) {
    let app = app_on(on, AppOptions::default()).await;
    let id = "CR-1";
    app.post_json(&json!({"transaction_id": id})).await;
    app.drain_until_terminal(&[id]).await;
    // The settle of the journaled success was lost: the ledger still says
    // `processing`, its lease long gone.
    let mut behind = app.record(id).await;
    behind.status = State::Processing;
    behind.lease_owner = Some("lost-worker".into());
    behind.lease_until = Some(Utc::now() - ChronoDuration::seconds(60));
    app.services.ledger.restore(behind).await.unwrap();

    let ledger = Arc::new(ReplayDuringPass {
        inner: app.services.ledger.clone(),
        replayer: app.services.replayer(),
        key: key(id),
        on_read,
        after_read,
        reads: AtomicUsize::new(0),
        replayed: AtomicBool::new(false),
    });
    let r = Reconciler {
        ledger: ledger.clone(),
        ..app.services.reconciler()
    };
    let now = Utc::now();
    let mut o = ReconcileOptions::new(now - ChronoDuration::minutes(5), now, Duration::ZERO);
    o.redrive = false;
    let report = r.reconcile(&o).await.unwrap();
    assert!(ledger.replayed.load(Ordering::SeqCst), "{report:?}");
    let rec = app.record(id).await;
    assert_eq!(rec.status, State::Pending, "the replay stands: {report:?}");
    assert!(rec.replay_nonce.is_some());
    app.drain_until_terminal(&[id]).await;
    assert_eq!(app.state_of(id).await, State::Success);
    assert_eq!(
        app.mock_calls().await["by_key"][key(id).as_str()]["calls"],
        2,
        "the replay called the downstream again"
    );
}

#[tokio::test]
async fn correct_never_undoes_a_replay_made_during_the_pass_sqlite() {
    correct_never_undoes_a_replay_made_during_the_pass(On::Sqlite, 1, false).await
}

#[tokio::test]
async fn correct_never_undoes_a_replay_made_during_the_pass_redis() {
    correct_never_undoes_a_replay_made_during_the_pass(On::Redis, 1, false).await
}

/// The same, the replay landing between the pass's second read of the
/// ledger and its correction: only the compare-and-set stops it.
#[tokio::test]
async fn correct_never_undoes_a_replay_made_during_the_correction_redis() {
    correct_never_undoes_a_replay_made_during_the_pass(On::Redis, 2, true).await
}

#[tokio::test]
async fn correct_never_undoes_a_replay_made_during_the_correction_postgres() {
    correct_never_undoes_a_replay_made_during_the_pass(On::Postgres, 2, true).await
}

/// Three transactions posted one at a time, each in a WAL segment of its
/// own, processed; the middle one's WAL reference.
async fn three_segments(app: &TestApp, ids: [&str; 3]) -> rtp_durability::transaction::WalRef {
    for id in ids {
        let r = app
            .post_json(&json!({"transaction_id": id, "amount": "1.00"}))
            .await;
        assert_eq!(r.status(), 202);
    }
    app.drain_until_terminal(&ids).await;
    let middle = app.record(ids[1]).await.wal_ref;
    for id in [ids[0], ids[2]] {
        assert_ne!(app.record(id).await.wal_ref.key, middle.key);
    }
    middle
}

/// The app's reconciler over `ledger`, reading the WAL and the journal
/// through `store` (a fault-injecting wrapper of the app's).
fn reconciler_on(
    app: &TestApp,
    store: &Arc<crate::support::stores::Switchable>,
    ledger: Arc<dyn Ledger>,
) -> Reconciler {
    use rtp_durability::journal::Journal;
    use rtp_durability::wal::{GroupCommit, JOURNAL_PREFIX, Log, WAL_PREFIX};
    Reconciler {
        wal: Log::start(store.clone(), WAL_PREFIX, "rebuild", GroupCommit::default()),
        journal: Journal::new(Log::start(
            store.clone(),
            JOURNAL_PREFIX,
            "rebuild",
            GroupCommit::default(),
        )),
        ledger,
        ..app.services.reconciler()
    }
}

/// A segment the store will not return keeps every pass incomplete — the
/// reconciler's watermark stays before it, a rebuild never marks the
/// ledger — until an operator accepts it as lost for good
/// (`rtpd wal accept-lost`, issue 13). The acceptance is kept beside the
/// log, so it outlives a ledger loss: later passes read the segment as
/// empty and complete. A key that names no segment, an hour, another
/// log's segment or a segment that reads is refused.
#[tokio::test]
async fn a_segment_accepted_as_lost_lets_passes_complete() {
    use crate::support::process::rtpd;
    use crate::support::stores::Switchable;
    let app = app_on(On::Sqlite, AppOptions::default()).await;
    let broken = three_segments(&app, ["AL-1", "AL-2", "AL-3"]).await;
    let store = Switchable::new(app.services.wal.store().clone());
    store.break_object(&broken.key);
    let reconciler = |ledger: Arc<dyn Ledger>| reconciler_on(&app, &store, ledger);
    let accept = |segment: &str| {
        rtpd()
            .args([
                "wal",
                "accept-lost",
                segment,
                "--reason",
                "blob gone after a restart",
            ])
            .env("RTPD_DATA_DIR", app.data_dir())
            .env("USER", "dana")
            .output()
            .unwrap()
    };
    let refused = |segment: &str, says: &str| {
        let out = accept(segment);
        assert_eq!(out.status.code(), Some(1), "{segment}: {out:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(says), "{segment}: {err}");
    };
    refused("wal/v1/2026/01/01/00/no-such-segment.ndjson", "no segment");
    // A segment that reads is not accepted (an acceptance is for good).
    refused(&broken.key, "reads now");
    // An hour, or a segment of the journal without --journal.
    let hour = broken.key.rsplit_once('/').unwrap().0;
    refused(hour, "is not a segment");
    refused(
        &broken.key.replacen("wal/v1", "outcomes/v1", 1),
        "is not a segment",
    );
    // The segment turns unreadable in the store itself: still listed, every
    // read fails while the store answers (a link to a directory where the
    // file was).
    let path = app.data_dir().join("objects").join(&broken.key);
    std::fs::rename(&path, app.data_dir().join("moved-away.ndjson")).unwrap();
    std::os::unix::fs::symlink(app.data_dir(), &path).unwrap();
    let out = accept(&broken.key);
    assert!(out.status.success(), "{out:?}");
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("accepted as lost by cli:dana"), "{said}");
    assert!(
        String::from_utf8_lossy(&accept(&broken.key).stdout).contains("already accepted"),
        "accepting twice changes nothing"
    );

    let now = Utc::now();
    let mut o = ReconcileOptions::new(now - ChronoDuration::minutes(5), now, Duration::ZERO);
    o.redrive = false;
    let rebuilt: Arc<dyn Ledger> =
        Arc::new(LocalLedger::open(&app.data_dir().join("rebuilt.db")).unwrap());
    let report = reconciler(rebuilt.clone()).reconcile(&o).await.unwrap();
    assert!(report.complete, "{report:?}");
    assert_eq!(report.unreadable_segments, 0, "{report:?}");
    assert_eq!(report.segments, 3, "the lost one read as empty: {report:?}");
    for id in ["AL-1", "AL-3"] {
        let rec = rebuilt.get(&key(id)).await.unwrap().expect("restored");
        assert_eq!(rec.status, State::Success, "{id}");
    }
    assert!(
        rebuilt.get(&key("AL-2")).await.unwrap().is_none(),
        "what the lost segment held is lost"
    );
}

/// Issue 13: a rebuild under faults. A store that fails a few reads is
/// waited for (the pass tries each read again), not given up on; a segment
/// the store keeps failing while it answers otherwise (Azurite after a
/// restart, one blob answering 500 for good) is skipped, counted and
/// named, and the rest of the ledger is rebuilt (before, the pass failed
/// on it every time), but the pass is not complete unless an operator
/// accepts the loss; while the store is down as a whole, nothing is
/// skipped: the pass fails and is tried again.
#[tokio::test]
async fn a_rebuild_waits_out_read_failures_and_skips_only_a_segment_that_never_reads() {
    use crate::support::stores::Switchable;
    use rtp_durability::wal::JOURNAL_PREFIX;
    use rtp_durability::wal::store::ObjectStore;
    let app = app_on(On::Sqlite, AppOptions::default()).await;
    let broken = three_segments(&app, ["SK-1", "SK-2", "SK-3"]).await;
    let store = Switchable::new(app.services.wal.store().clone());
    let on_store = |ledger: Arc<dyn Ledger>| reconciler_on(&app, &store, ledger);
    let fresh = |name: &str| -> Arc<dyn Ledger> {
        Arc::new(LocalLedger::open(&app.data_dir().join(name)).unwrap())
    };
    let now = Utc::now();
    let mut o = ReconcileOptions::new(now - ChronoDuration::minutes(5), now, Duration::ZERO);
    o.redrive = false;

    // A few failed reads: waited out, nothing skipped.
    let rebuilt = fresh("rebuilt-1.db");
    store.fail_next_gets(4);
    let report = on_store(rebuilt.clone()).reconcile(&o).await.unwrap();
    assert!(report.complete, "{report:?}");
    assert_eq!(report.unreadable_segments, 0, "{report:?}");
    assert_eq!(report.restored_finished, 3, "{report:?}");

    // One segment that never reads while the store answers: the rest is
    // restored, but the pass did not see everything, so it is not complete
    // (no intact mark, no watermark past it: an id of that segment would
    // look new to ingest)...
    let rebuilt = fresh("rebuilt-2.db");
    store.break_object(&broken.key);
    let report = on_store(rebuilt.clone()).reconcile(&o).await.unwrap();
    assert!(!report.complete, "{report:?}");
    assert_eq!(report.unreadable_segments, 1, "{report:?}");
    for id in ["SK-1", "SK-3"] {
        let rec = rebuilt.get(&key(id)).await.unwrap().expect("restored");
        assert_eq!(rec.status, State::Success, "{id}");
    }
    assert!(rebuilt.get(&key("SK-2")).await.unwrap().is_none());
    // ... unless an operator accepts losing it
    // (`rtpd rebuild-ledger --accept-unreadable-segments`).
    let mut accepting = o.clone();
    accepting.accept_unreadable = true;
    let report = on_store(fresh("rebuilt-2b.db"))
        .reconcile(&accepting)
        .await
        .unwrap();
    assert!(report.complete, "{report:?}");
    assert_eq!(report.unreadable_segments, 1, "{report:?}");

    // A journal segment that never reads: the pass fails before it writes
    // anything (it would act on a journal with a hole: a finished payment
    // taken for unfinished and re-driven), and says how to accept the loss.
    let journal_segment = store
        .list(JOURNAL_PREFIX)
        .await
        .unwrap()
        .first()
        .expect("the outcomes are journaled")
        .key
        .clone();
    store.break_object(&journal_segment);
    let rebuilt = fresh("rebuilt-4.db");
    let err = on_store(rebuilt.clone()).reconcile(&o).await.unwrap_err();
    assert!(
        err.to_string().contains("--accept-unreadable-segments"),
        "{err}"
    );
    assert_eq!(
        rebuilt.counts().await.unwrap().total(),
        0,
        "nothing written"
    );
    let report = on_store(fresh("rebuilt-4b.db"))
        .reconcile(&accepting)
        .await
        .unwrap();
    assert!(report.complete, "{report:?}");
    assert_eq!(report.unreadable_segments, 2, "{report:?}");

    // The whole store down: the pass fails (after its patience), skipping nothing.
    store.set_down(true);
    let rebuilt = fresh("rebuilt-3.db");
    let err = on_store(rebuilt.clone()).reconcile(&o).await.unwrap_err();
    assert!(err.to_string().contains("unavailable"), "{err}");
    assert!(rebuilt.get(&key("SK-1")).await.unwrap().is_none());
}
