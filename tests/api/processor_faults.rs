//! Recovery paths of the processor (issue 12): each test is named after the
//! defect it proves fixed, runs the real processor against a real mock
//! downstream, and the ledger on SQLite, Redis or PostgreSQL.

use crate::support::{AppOptions, TestApp, json, spawn_app_with};
use rtp_durability::config::LedgerKind;
use rtp_durability::processor::Outcome;
use rtp_durability::transaction::State;
use serde_json::json;

/// The ledgers every recovery scenario runs on.
#[derive(Clone, Copy, Debug)]
pub enum On {
    Sqlite,
    Redis,
    Postgres,
}

pub async fn app_on(on: On, mut o: AppOptions) -> TestApp {
    match on {
        On::Sqlite => {}
        On::Redis => o.redis_url = Some(crate::support::redis_url()),
        On::Postgres => {
            let url = crate::support::postgres::schema_url().await;
            o.tweak = Some(Box::new(move |s| {
                s.ledger = LedgerKind::Postgres;
                s.postgres_url = Some(url.as_str().into());
            }));
        }
    }
    spawn_app_with(o).await
}

/// Downstream calls for the transaction `id` addresses (see
/// [`TestApp::find`]), counted under its `Idempotency-Key`: the ledger key.
pub async fn calls_for(app: &TestApp, id: &str) -> u64 {
    let key = match app.find(id).await {
        Some(r) => r.transaction_id.to_string(),
        None => id.to_owned(),
    };
    app.mock_calls().await["by_key"][key.as_str()]["calls"]
        .as_u64()
        .unwrap_or(0)
}

/// Issue 12 item 1: a transaction dead-lettered because its retries ran out,
/// replayed after the downstream recovered, is called again with a full
/// retry budget (the fencing attempt number keeps growing).
async fn replay_after_exhausted_retries(on: On) {
    let app = app_on(
        on,
        AppOptions {
            max_retries: 2,
            ..Default::default()
        },
    )
    .await;
    let id = "RB-1";
    app.post_json(
        &json!({"transaction_id": id, "_mock": {"script": ["503", "503", "503", "503", "ok"]}}),
    )
    .await;
    app.drain_until_terminal(&[id]).await;
    let rec = app.record(id).await;
    assert_eq!(rec.status, State::DeadLetter);
    assert_eq!(rec.attempts, 3, "first call + 2 retries");
    assert_eq!(calls_for(&app, id).await, 3);

    // Replay: a full budget again. Call 4 answers 503 (a retry is scheduled,
    // not a dead-letter), call 5 succeeds.
    let r = app
        .admin_post(&format!("/v1/transactions/{id}/replay"), None)
        .await;
    assert!(r.status().is_success(), "{}", json(r).await);
    let rec = app.record(id).await;
    assert_eq!(rec.status, State::Pending);
    assert_eq!(rec.attempt_base, 3);
    assert_eq!(rec.retry_count, 0, "the retry count restarts");
    let outcomes = app.drain_until_terminal(&[id]).await;
    assert!(
        outcomes.contains(&Outcome::RetryScheduled),
        "the replayed copy may be retried: {outcomes:?}"
    );
    let rec = app.record(id).await;
    assert_eq!(rec.status, State::Success, "{rec:?}");
    assert_eq!(rec.attempts, 5, "the fencing token keeps growing");
    assert_eq!(calls_for(&app, id).await, 5);
}

#[tokio::test]
async fn replay_after_exhausted_retries_grants_fresh_budget_sqlite() {
    replay_after_exhausted_retries(On::Sqlite).await
}

#[tokio::test]
async fn replay_after_exhausted_retries_grants_fresh_budget_redis() {
    replay_after_exhausted_retries(On::Redis).await
}

#[tokio::test]
async fn replay_after_exhausted_retries_grants_fresh_budget_postgres() {
    replay_after_exhausted_retries(On::Postgres).await
}

/// Issue 12 item 1, end to end as it was reproduced: `rtpd dev` and
/// `rtpd mock-downstream` as real processes, `RTPD_MAX_RETRIES=2`, the mock
/// answering `503, 503, 503, ok`. Exhausted retries dead-letter after three
/// calls; the operator's replay then calls the downstream once more and
/// succeeds.
#[tokio::test]
async fn replay_after_exhausted_retries_succeeds_end_to_end_with_the_binary() {
    use crate::support::process::{Proc, poll_json, rtpd, start_mock};
    use std::{process::Stdio, time::Duration};
    let dir = tempfile::tempdir().unwrap();
    let (_mock, mock_port) = start_mock(&[]).await;
    let api_port = crate::support::free_port();
    let _dev = Proc(
        rtpd()
            .args(["dev", "--no-mock"])
            .env("RTPD_DATA_DIR", dir.path())
            .env("RTPD_HTTP_ADDR", format!("127.0.0.1:{api_port}"))
            .env(
                "RTPD_DOWNSTREAM_URL",
                format!("http://127.0.0.1:{mock_port}/process"),
            )
            .env("RTPD_MAX_RETRIES", "2")
            .env("RTPD_BACKOFF_BASE_SECS", "0.1")
            .env("RTPD_BACKOFF_MAX_SECS", "0.2")
            // A replay right after the last failed attempt waits lock +
            // downstream timeout (the call may still run downstream): 5 s.
            .env("RTPD_LOCK_DURATION_SECS", "3")
            .env("RTPD_DOWNSTREAM_TIMEOUT_SECS", "2")
            .env("RTPD_LOG_LEVEL", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let base = format!("http://127.0.0.1:{api_port}");
    crate::support::process::wait_http_ok(&format!("{base}/healthz"), Duration::from_secs(20))
        .await;
    let creds: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("dev-credentials.json")).unwrap(),
    )
    .unwrap();
    let (key, admin) = (
        creds["api_key"].as_str().unwrap(),
        creds["admin_token"].as_str().unwrap(),
    );
    let client = reqwest::Client::new();
    let id = "E2E-RB-1";
    // The downstream's Idempotency-Key: the ledger key `<vendor>/<id>`.
    let idem = format!("{}/{id}", creds["vendor"].as_str().unwrap());
    let r = client
        .post(format!("{base}/v1/transactions"))
        .header("X-Api-Key", key)
        .json(&json!({"transaction_id": id, "_mock": {"script": ["503", "503", "503", "ok"]}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let status = |want: &'static str| {
        let url = format!("{base}/v1/transactions/{id}");
        let key = key.to_owned();
        async move {
            let client = reqwest::Client::new();
            let deadline = std::time::Instant::now() + Duration::from_secs(30);
            loop {
                let v: serde_json::Value = client
                    .get(&url)
                    .header("X-Api-Key", &key)
                    .send()
                    .await
                    .unwrap()
                    .json()
                    .await
                    .unwrap();
                if v["status"] == want {
                    return v;
                }
                assert!(
                    std::time::Instant::now() < deadline,
                    "{id} never {want}: {v}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    status("dead_letter").await;
    let calls = format!("http://127.0.0.1:{mock_port}/calls");
    let before = poll_json(&calls, Duration::from_secs(5), |v| {
        v["by_key"][idem.as_str()]["calls"] == 3
    })
    .await;
    assert_eq!(
        before["by_key"][idem.as_str()]["calls"],
        3,
        "first call + 2 retries"
    );

    let r = client
        .post(format!("{base}/v1/transactions/{id}/replay"))
        .bearer_auth(admin)
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success());
    let answer: serde_json::Value = r.json().await.unwrap();
    assert!(
        answer["due_at"].is_string(),
        "a replay right after a failed attempt says when it runs: {answer}"
    );
    let done = status("success").await;
    assert_eq!(done["attempts"], 4, "{done}");
    let after = crate::support::process::mock_calls(mock_port).await;
    assert_eq!(
        after["by_key"][idem.as_str()]["calls"],
        4,
        "one more downstream call per replay"
    );
    assert_eq!(after["by_key"][idem.as_str()]["successes"], 1);
}

/// A replay waits out the window the processors published, not only the
/// one of the process that replays (issue 12: `rtpd replay` run with other
/// settings than the service, or an api configured apart from the
/// processors, computed a shorter window and could call while a timed-out
/// call of the processors' may still run). A processor publishes its lock
/// duration + downstream timeout when it starts; the replay takes the
/// longer of that and its own.
#[tokio::test]
async fn a_replay_waits_the_window_the_processors_published() {
    let app = app_on(On::Sqlite, AppOptions::default()).await;
    let id = "PW-1";
    app.post_json(&json!({"transaction_id": id, "_mock": {"script": ["400"]}}))
        .await;
    let outcome = app
        .processor
        .try_process_next(std::time::Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(outcome, Outcome::DeadLettered);
    // A processor configured with a 50-minute lock starts (and stops).
    let mut p = app.services.processor().unwrap();
    p.lock_duration = std::time::Duration::from_secs(3000);
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let run = tokio::spawn(rtp_durability::processor::run(
        std::sync::Arc::new(p),
        1,
        stopped,
        std::time::Duration::from_secs(1),
    ));
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    stop.send(true).unwrap();
    run.await.unwrap().unwrap();

    let r = app
        .admin_post(&format!("/v1/transactions/{id}/replay"), None)
        .await;
    assert_eq!(r.status(), 202);
    let answer = json(r).await;
    let due: chrono::DateTime<chrono::Utc> = answer["due_at"]
        .as_str()
        .unwrap_or_else(|| panic!("the replay waits: {answer}"))
        .parse()
        .unwrap();
    let wait = due - chrono::Utc::now();
    assert!(
        wait > chrono::Duration::minutes(45),
        "the processors' 50-minute window, not this process's: {answer}"
    );
}

/// Issue 12 item 10: a copy of a transaction carrying other bytes than the
/// ledger accepted (a stale or forged message; its body hashes to its own
/// sha256) never reaches the downstream. The transaction is left `failed`
/// and due, the stale copy dead-lettered, and the true payload then goes
/// through.
async fn stale_copy_with_other_bytes(on: On) {
    use bytes::Bytes;
    use rtp_durability::envelope::{Delivery, Envelope};
    use rtp_durability::transaction::Sha256;
    use std::time::Duration;
    let app = app_on(on, AppOptions::default()).await;
    let id = "SC-1";
    app.post_json(&json!({"transaction_id": id, "amount": "1.00"}))
        .await;
    let rec = app.record(id).await;
    // Hold the true message back while the stale copy is processed.
    let original = app
        .services
        .queue
        .receive(1, Duration::from_secs(2))
        .await
        .unwrap()
        .pop()
        .unwrap();
    let other = Bytes::from_static(br#"{"transaction_id":"SC-1","amount":"999.00"}"#);
    let reg = rtp_durability::transaction::Registration {
        transaction_id: rec.transaction_id.clone(),
        sha256: Sha256::of(&other),
        wal_ref: rec.wal_ref.clone(),
        vendor: rec.vendor.clone(),
        received_at: rec.created_at,
        expires_at: None,
    };
    let stale = Envelope::new(reg, other, Delivery::Redrive("stale".into())).to_message();
    app.services.queue.send(vec![stale]).await.unwrap();
    let outcome = app
        .processor
        .try_process_next(Duration::from_secs(2))
        .await
        .unwrap();
    assert_eq!(outcome, Outcome::DeadLettered);
    assert_eq!(
        calls_for(&app, id).await,
        0,
        "other bytes never go downstream"
    );
    let after = app.record(id).await;
    assert_eq!(after.status, State::Failed, "{after:?}");
    assert_eq!(after.sha256, rec.sha256);
    let dl = app.services.queue.peek_dead_letters(0, 10).await.unwrap();
    assert_eq!(dl.len(), 1);
    assert_eq!(dl[0].dead_letter_reason.as_deref(), Some("LedgerConflict"));

    // The true message, released, goes through with the accepted bytes.
    app.services.queue.abandon(&original).await.unwrap();
    app.drain_until_terminal(&[id]).await;
    assert_eq!(app.state_of(id).await, State::Success);
    assert_eq!(calls_for(&app, id).await, 1);
}

#[tokio::test]
async fn processor_refuses_a_copy_whose_sha256_differs_from_the_ledger_sqlite() {
    stale_copy_with_other_bytes(On::Sqlite).await
}

#[tokio::test]
async fn processor_refuses_a_copy_whose_sha256_differs_from_the_ledger_redis() {
    stale_copy_with_other_bytes(On::Redis).await
}

/// Issue 12 item 11: a retry copy that arrives before its retry is due (the
/// only copy there is) is rescheduled for `next_retry_at`, not completed and
/// lost — or, when it is due before its lock runs low (issue 12 item 12),
/// waits for it under the lock, with no new copy.
async fn early_retry_copy(on: On, early_by_ms: i64, first_expected: Outcome) {
    use bytes::Bytes;
    use rtp_durability::envelope::{Delivery, Envelope};
    use rtp_durability::transaction::{Registration, Settlement, Sha256, TransactionId};
    use std::time::Duration;
    let app = app_on(on, AppOptions::default()).await;
    let id = "ND-1";
    let body = Bytes::from_static(br#"{"transaction_id":"ND-1"}"#);
    let reg = Registration {
        transaction_id: TransactionId::parse(id).unwrap(),
        sha256: Sha256::of(&body),
        wal_ref: "wal/v1/2026/01/01/00/x.ndjson#0+25".parse().unwrap(),
        vendor: Some("acme".into()),
        received_at: chrono::Utc::now(),
        expires_at: None,
    };
    let ledger = &app.services.ledger;
    ledger.register(reg.clone()).await.unwrap();
    ledger
        .claim(id, "earlier-worker", Duration::from_secs(30))
        .await
        .unwrap();
    let due = chrono::Utc::now() + chrono::Duration::milliseconds(early_by_ms);
    ledger
        .settle(
            id,
            "earlier-worker",
            1,
            Settlement::Failed {
                error: "503".into(),
                next_retry_at: due,
            },
        )
        .await
        .unwrap();
    // The retry copy, delivered early (its sender's clock ran ahead).
    let early = Envelope::new(reg, body, Delivery::Retry(2)).to_message();
    app.services.queue.send(vec![early]).await.unwrap();
    let first = app
        .processor
        .try_process_next(Duration::from_secs(1))
        .await
        .unwrap();
    assert_eq!(first, first_expected);
    if first == Outcome::Succeeded {
        // Waited under its lock: called once it was due, nothing left queued.
        assert!(chrono::Utc::now() >= due);
    } else {
        assert_eq!(calls_for(&app, id).await, 0, "not called before it is due");
        // The rescheduled copy arrives once due and the retry runs.
        let outcomes = app.drain_until_terminal(&[id]).await;
        assert_eq!(outcomes, vec![Outcome::Succeeded]);
    }
    assert_eq!(calls_for(&app, id).await, 1);
    app.assert_queue_empty().await;
}

// Due after the 2 s lock: rescheduled.
#[tokio::test]
async fn early_retry_copy_is_rescheduled_not_dropped_sqlite() {
    early_retry_copy(On::Sqlite, 2500, Outcome::Skipped("retry_rescheduled")).await
}

#[tokio::test]
async fn early_retry_copy_is_rescheduled_not_dropped_redis() {
    early_retry_copy(On::Redis, 2500, Outcome::Skipped("retry_rescheduled")).await
}

// Due well within the lock: waits for it, no copy sent again.
#[tokio::test]
async fn early_retry_copy_due_within_its_lock_waits_for_it_sqlite() {
    early_retry_copy(On::Sqlite, 500, Outcome::Succeeded).await
}

#[tokio::test]
async fn early_retry_copy_due_within_its_lock_waits_for_it_redis() {
    early_retry_copy(On::Redis, 500, Outcome::Succeeded).await
}

/// Issue 12 item 7: an attempt whose success reached the journal but not the
/// ledger (the settle failed after the journal write) is not followed by a
/// second downstream call: the next claim reads the journal and settles the
/// ledger from it.
async fn journaled_success(on: On) {
    journaled_success_then(on, false).await
}

/// A transaction whose success is journaled but whose settle never reached
/// the ledger (its worker died in between: `processing`, the lease gone)
/// is not replayed without force: 409, saying the journal holds its
/// success; the processor then records that success without a call (issue
/// 12 item 7; simulation seed 693, found by a reviewer: the replay reset
/// the journal's view and the budget, and the next claim called, answered
/// 409 by the downstream).
async fn journaled_success_then(on: On, replay: bool) {
    use rtp_durability::journal::{EntryKind, JournalEntry};
    use std::time::Duration;
    let app = app_on(on, AppOptions::default()).await;
    let id = "JS-1";
    app.post_json(&json!({"transaction_id": id})).await;
    // A worker claimed it, the downstream took it, the journal says so ...
    let ledger = &app.services.ledger;
    // The ledger key (and journal key) of the transaction: `<vendor>/<id>`.
    let key = app.record(id).await.transaction_id.to_string();
    let rtp_durability::ledger::ClaimOutcome::Claimed(c) = ledger
        .claim(&key, "lost-worker", Duration::from_millis(1))
        .await
        .unwrap()
    else {
        panic!("claimable")
    };
    app.services
        .journal
        .append(&JournalEntry {
            v: 1,
            kind: EntryKind::Attempt,
            transaction_id: key.clone(),
            at: chrono::Utc::now(),
            attempt: Some(c.attempts),
            state: State::Success,
            error: None,
            next_retry_at: None,
            actor: "lost-worker".into(),
            reason: None,
            sha256: None,
            wal_ref: None,
            replay_nonce: None,
            latency_ms: None,
        })
        .await
        .unwrap();
    // ... and its settle never reached the ledger: still `processing`, lease gone.
    assert_eq!(app.state_of(id).await, State::Processing);
    tokio::time::sleep(Duration::from_millis(5)).await;
    if replay {
        let r = app
            .admin_post(&format!("/v1/transactions/{id}/replay"), None)
            .await;
        let b = json(r).await;
        assert_eq!(b["error"], "invalid_state", "{b}");
        assert!(b["message"].as_str().unwrap().contains("journal"), "{b}");
        app.drain_until_terminal(&[id]).await;
    } else {
        let outcome = app
            .processor
            .try_process_next(Duration::from_secs(2))
            .await
            .unwrap();
        assert_eq!(outcome, Outcome::Skipped("already_done"));
    }
    assert_eq!(app.state_of(id).await, State::Success);
    assert_eq!(
        calls_for(&app, id).await,
        0,
        "no call after a journaled success"
    );
    app.assert_queue_empty().await;
}

#[tokio::test]
async fn a_replay_of_a_lapsed_claim_whose_success_is_journaled_does_not_call_again_sqlite() {
    journaled_success_then(On::Sqlite, true).await
}

#[tokio::test]
async fn a_replay_of_a_lapsed_claim_whose_success_is_journaled_does_not_call_again_redis() {
    journaled_success_then(On::Redis, true).await
}

#[tokio::test]
async fn claim_after_a_journaled_success_does_not_call_again_sqlite() {
    journaled_success(On::Sqlite).await
}

#[tokio::test]
async fn claim_after_a_journaled_success_does_not_call_again_redis() {
    journaled_success(On::Redis).await
}

/// Claims `key` as a worker of a lost process would: an attempt that starts
/// and never records an outcome (its lease runs out at once).
async fn attempt_without_outcome(app: &TestApp, key: &str) {
    use std::time::Duration;
    let c = app
        .services
        .ledger
        .claim(key, "lost-worker", Duration::from_millis(1))
        .await
        .unwrap();
    assert!(
        matches!(c, rtp_durability::ledger::ClaimOutcome::Claimed(_)),
        "{c:?}"
    );
    tokio::time::sleep(Duration::from_millis(5)).await;
}

/// The downstream call of a lost attempt that paid: made as the processor
/// makes it, under the transaction's key.
async fn paid_by_a_lost_attempt(app: &TestApp, key: &str, body: String) {
    let paid = app
        .client
        .post(format!("{}/process", app.mock_address))
        .header("Idempotency-Key", key)
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(paid.status(), 200);
}

/// The fault campaign's `executed_but_dead_lettered` (seed 2, 2026-11-30):
/// attempts whose process died mid-call spent the retry budget, one of them
/// had paid, and the next claim dead-lettered without asking. Past the
/// budget, one more call under the same idempotency key learns it: the
/// downstream answers 409 "already processed", a success.
#[tokio::test]
async fn attempts_without_an_outcome_end_with_a_call_that_learns_one_paid() {
    let app = spawn_app_with(AppOptions {
        max_retries: 1,
        ..Default::default()
    })
    .await;
    let id = "AWO-1";
    app.post_json(&json!({"transaction_id": id})).await;
    let key = app.record(id).await.transaction_id.to_string();
    // The budget (max_retries + 1 = 2 attempts) spent by two lost attempts,
    // the second of which reached the downstream and paid.
    attempt_without_outcome(&app, &key).await;
    attempt_without_outcome(&app, &key).await;
    paid_by_a_lost_attempt(&app, &key, r#"{"transaction_id":"AWO-1"}"#.into()).await;
    app.drain_until_terminal(&[id]).await;
    let rec = app.record(id).await;
    assert_eq!(rec.status, State::Success, "{rec:?}");
    assert_eq!(
        calls_for(&app, id).await,
        2,
        "the lost attempt's and one more"
    );
}

/// The fault campaign's `executed_but_dead_lettered` again (seed 1,
/// 2026-11-30): the one call past the budget met a 5xx storm and the
/// transaction, which had paid, was dead-lettered. A transient failure of
/// a call past the budget is tried again (up to `FINAL_CALLS` calls), so
/// the next call learns that it paid.
#[tokio::test]
async fn a_final_call_that_meets_a_downstream_blip_is_tried_again() {
    let app = spawn_app_with(AppOptions {
        max_retries: 1,
        ..Default::default()
    })
    .await;
    let id = "AWO-3";
    // Call 1 (the lost attempt that paid) ok, call 2 a 503, then ok.
    let body = json!({"transaction_id": id, "_mock": {"script": ["ok", "503", "ok"]}});
    app.post_json(&body).await;
    let key = app.record(id).await.transaction_id.to_string();
    attempt_without_outcome(&app, &key).await;
    attempt_without_outcome(&app, &key).await;
    paid_by_a_lost_attempt(&app, &key, body.to_string()).await;
    app.drain_until_terminal(&[id]).await;
    let rec = app.record(id).await;
    assert_eq!(rec.status, State::Success, "{rec:?}");
    assert_eq!(
        calls_for(&app, id).await,
        3,
        "the lost attempt's, the 503 and the one that learnt it paid"
    );
}

/// ... and past those calls a crash loop is still dead-lettered, without
/// calling again.
#[tokio::test]
async fn a_crash_loop_past_the_final_call_is_dead_lettered_without_a_call() {
    let max_retries = 1;
    let app = spawn_app_with(AppOptions {
        max_retries,
        ..Default::default()
    })
    .await;
    let id = "AWO-2";
    app.post_json(&json!({"transaction_id": id})).await;
    let key = app.record(id).await.transaction_id.to_string();
    // Every attempt of the budget and every final call lost.
    for _ in 0..max_retries + 1 + rtp_durability::processor::FINAL_CALLS {
        attempt_without_outcome(&app, &key).await;
    }
    app.drain_until_terminal(&[id]).await;
    let rec = app.record(id).await;
    assert_eq!(rec.status, State::DeadLetter, "{rec:?}");
    assert!(
        rec.error_message
            .as_deref()
            .is_some_and(|e| e.contains("without an outcome")),
        "{rec:?}"
    );
    assert_eq!(calls_for(&app, id).await, 0);
}
