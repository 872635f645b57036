//! The vendor's deadline (`expires_at`, issue 12): no downstream call starts
//! after it; the transaction dead-letters with `DeadlineExceeded`.

use crate::processor_faults::{On, app_on, calls_for};
use crate::support::{API_KEY, AppOptions, json, spawn_app, spawn_app_with};
use chrono::{DateTime, Duration as ChronoDuration, SubsecRound, Utc};
use rtp_durability::transaction::State;
use serde_json::json;

#[tokio::test]
async fn deadline_passed_dead_letters_without_a_downstream_call() {
    let app = spawn_app().await;
    let past = (Utc::now() - ChronoDuration::seconds(1)).to_rfc3339();
    let r = app
        .post_json(&json!({"transaction_id": "DL-1", "expires_at": past}))
        .await;
    assert_eq!(r.status(), 202);
    app.drain_until_terminal(&["DL-1"]).await;
    let rec = app.record("DL-1").await;
    assert_eq!(rec.status, State::DeadLetter);
    assert!(
        rec.error_message
            .as_deref()
            .is_some_and(|e| e.starts_with("deadline_exceeded")),
        "{rec:?}"
    );
    assert_eq!(
        calls_for(&app, "DL-1").await,
        0,
        "no call after the deadline"
    );
    let dl = app.services.queue.peek_dead_letters(0, 10).await.unwrap();
    assert_eq!(dl.len(), 1);
    assert_eq!(
        dl[0].dead_letter_reason.as_deref(),
        Some("DeadlineExceeded")
    );
}

/// A transient failure whose next retry would start after the deadline ends
/// the transaction at once rather than scheduling a retry that cannot run.
#[tokio::test]
async fn retries_stop_at_the_deadline() {
    let app = spawn_app_with(AppOptions {
        configure: |s| {
            s.backoff_base_secs = 30.0;
            s.backoff_max_secs = 30.0;
        },
        ..Default::default()
    })
    .await;
    let deadline = (Utc::now() + ChronoDuration::seconds(10)).to_rfc3339();
    let r = app
        .client
        .post(format!("{}/v1/transactions", app.address))
        .header("X-Api-Key", API_KEY)
        .header("X-Rtpd-Expires-At", &deadline)
        .json(&json!({"transaction_id": "DL-2", "_mock": {"script": ["503", "ok"]}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    app.drain_until_terminal(&["DL-2"]).await;
    let rec = app.record("DL-2").await;
    assert_eq!(rec.status, State::DeadLetter, "{rec:?}");
    assert_eq!(rec.attempts, 1);
    assert!(rec.error_message.unwrap().starts_with("deadline_exceeded"));
    assert_eq!(calls_for(&app, "DL-2").await, 1);
    app.assert_queue_empty().await;
}

#[tokio::test]
async fn invalid_expires_at_is_a_400_naming_the_field() {
    let app = spawn_app().await;
    for (name, body, header) in [
        (
            "body text",
            json!({"transaction_id": "BAD-1", "expires_at": "tomorrow"}),
            None,
        ),
        (
            "body number",
            json!({"transaction_id": "BAD-2", "expires_at": 17}),
            None,
        ),
        ("header", json!({"transaction_id": "BAD-3"}), Some("soon")),
        (
            "body and header differ",
            json!({"transaction_id": "BAD-4", "expires_at": "2030-01-01T00:00:00Z"}),
            Some("2030-01-02T00:00:00Z"),
        ),
    ] {
        let mut r = app
            .client
            .post(format!("{}/v1/transactions", app.address))
            .header("X-Api-Key", API_KEY)
            .json(&body);
        if let Some(h) = header {
            r = r.header("X-Rtpd-Expires-At", h);
        }
        let r = r.send().await.unwrap();
        assert_eq!(r.status(), 400, "{name}");
        let b = json(r).await;
        assert_eq!(b["error"], "invalid_expires_at", "{name}: {b}");
        assert!(
            b["message"]
                .as_str()
                .is_some_and(|m| m.contains("expires_at") || m.contains("Expires-At")),
            "{name}: {b}"
        );
    }
    app.assert_queue_empty().await;
    assert_eq!(app.services.ledger.counts().await.unwrap().total(), 0);
}

async fn expires_at_is_stored(on: On) {
    let app = app_on(on, AppOptions::default()).await;
    let at: DateTime<Utc> = (Utc::now() + ChronoDuration::days(1)).trunc_subsecs(6);
    let r = app
        .post_json(&json!({"transaction_id": "DL-S", "expires_at": at.to_rfc3339()}))
        .await;
    assert_eq!(r.status(), 202);
    assert_eq!(app.record("DL-S").await.expires_at, Some(at));
    let shown = json(app.get_tx("DL-S").await).await;
    assert_eq!(
        shown["expires_at"]
            .as_str()
            .map(|s| s.parse::<DateTime<Utc>>().unwrap()),
        Some(at),
        "{shown}"
    );
    app.drain_until_terminal(&["DL-S"]).await;
    assert_eq!(app.state_of("DL-S").await, State::Success);
}

#[tokio::test]
async fn expires_at_is_stored_by_the_sqlite_ledger() {
    expires_at_is_stored(On::Sqlite).await
}

#[tokio::test]
async fn expires_at_is_stored_by_the_redis_ledger() {
    expires_at_is_stored(On::Redis).await
}

#[tokio::test]
async fn expires_at_is_stored_by_the_postgres_ledger() {
    expires_at_is_stored(On::Postgres).await
}
