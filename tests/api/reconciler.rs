//! Recovery paths of the reconciler (issue 12), against the real pipeline.

use crate::processor_faults::{On, app_on};
use crate::support::{AppOptions, TestApp, VENDOR, key};
use chrono::{Duration as ChronoDuration, Utc};
use rtp_durability::reconcile::ReconcileOptions;
use rtp_durability::transaction::{Sha256, State, TransactionId};
use rtp_durability::wal::{Source, WalRecord};
use serde_json::json;
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
