//! Redis restarted without persistence under a running service: while it is
//! down the service says so (ingest 503 + Retry-After, never a 2xx; readiness
//! stays 200 and reports the ledger down, so the replica keeps answering
//! vendors itself); when it is back (empty) the service recovers by itself, and every
//! transaction acknowledged before the outage is still in the WAL although
//! the ledger has forgotten it. Found without its intact mark, the ledger
//! refuses registrations (503) until it is rebuilt from the WAL, so no id
//! acknowledged before the loss takes other bytes (issue 12, N1).

use crate::support::process::OwnRedis;
use crate::support::{AppOptions, json, spawn_app_with};
use serde_json::json;
use std::time::{Duration, Instant};

#[tokio::test]
async fn losing_redis_loses_no_acknowledged_transaction() {
    let mut redis = OwnRedis::start();
    let app = spawn_app_with(AppOptions {
        redis_url: Some(redis.url()),
        ..Default::default()
    })
    .await;
    assert_eq!(app.admin_get("/readyz").await.status(), 200);

    let mut acked = Vec::new();
    for i in 0..5 {
        let id = format!("before-{i}");
        let r = app
            .post_json(&json!({ "transaction_id": id, "amount": i }))
            .await;
        assert_eq!(r.status(), 202, "accepted while Redis is up");
        let body = json(r).await;
        acked.push((
            id,
            body["wal"]["ref"].as_str().unwrap().to_owned(),
            body["wal"]["sha256"].as_str().unwrap().to_owned(),
        ));
    }
    assert_eq!(app.services.ledger.counts().await.unwrap().pending, 5);

    redis.kill();

    // /readyz reuses its last dependency check for a second: past it.
    tokio::time::sleep(rtp_durability::api::health::CHECK_REUSED_FOR + Duration::from_millis(100))
        .await;
    let ready = app.admin_get("/readyz").await;
    assert_eq!(ready.status(), 200, "still in the load balancer");
    let ready = json(ready).await;
    assert_eq!(ready["status"], "degraded", "{ready}");
    assert!(
        ready["dependencies"]["ledger"]
            .as_str()
            .unwrap()
            .starts_with("unavailable"),
        "{ready}"
    );
    assert_eq!(app.admin_get("/status").await.status(), 503);
    for i in 0..3 {
        let started = Instant::now();
        let r = app
            .post_json(&json!({ "transaction_id": format!("during-{i}"), "amount": i }))
            .await;
        assert_eq!(r.status(), 503, "never a 2xx without the ledger");
        assert!(r.headers().get("retry-after").is_some());
        let body = json(r).await;
        assert_eq!(body["error"], "unavailable", "{body}");
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "a dead Redis answers fast: {:?}",
            started.elapsed()
        );
    }

    redis.launch(); // empty: no persistence

    let deadline = Instant::now() + Duration::from_secs(15);
    while let Err(e) = app.services.ledger.ping().await {
        assert!(Instant::now() < deadline, "Redis did not come back: {e}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Back, but empty: an id acknowledged before the loss would look new,
    // so nothing is registered before the ledger is rebuilt (issue 12, N1).
    // Other bytes under an acknowledged id, the vendor's retry of a refused
    // POST and a brand-new one: all 503, nothing accepted.
    // The first refusal comes after its WAL append (the ledger says it is
    // lost only when asked to register); once intake knows, it asks the
    // ledger first and writes nothing for the next ones (issue 13: under
    // retrying vendors each 503 cost a WAL record and a journal note).
    let wal_segments = || async {
        let now = chrono::Utc::now();
        app.services
            .wal
            .segments(now - chrono::Duration::hours(1), now)
            .await
            .unwrap()
            .len()
    };
    let mut written = None;
    for (id, amount) in [("before-0", 99), ("during-0", 0), ("after-0", 1)] {
        let r = app
            .post_json(&json!({ "transaction_id": id, "amount": amount }))
            .await;
        assert_eq!(r.status(), 503, "{id}: the lost ledger is not rebuilt yet");
        assert!(r.headers().get("retry-after").is_some());
        let body = json(r).await;
        assert_eq!(body["error"], "unavailable", "{body}");
        assert!(
            body["message"].as_str().unwrap().contains("being rebuilt"),
            "{body}"
        );
        let n = wal_segments().await;
        match written {
            None => written = Some(n),
            Some(w) => assert_eq!(n, w, "{id}: a WAL record written for a known-lost ledger"),
        }
    }
    assert!(!app.services.ledger.intact().await.unwrap());
    tokio::time::sleep(rtp_durability::api::health::CHECK_REUSED_FOR + Duration::from_millis(100))
        .await;
    let status = app.admin_get("/status").await;
    assert_eq!(status.status(), 503, "answering, but registering nothing");
    let ready = json(app.admin_get("/readyz").await).await;
    assert_eq!(ready["status"], "degraded", "{ready}");
    assert!(
        ready["dependencies"]["ledger"]
            .as_str()
            .unwrap()
            .contains("lost its data"),
        "{ready}"
    );

    // What the recovery watcher (and the periodic reconciler) of a running
    // `rtpd` does when it finds the ledger without its intact mark.
    let rebuilt = app
        .services
        .reconciler()
        .rebuild_if_lost(Duration::from_secs(3600))
        .await
        .unwrap();
    assert_eq!(rebuilt, Some(true), "rebuilt and marked");
    assert!(app.services.ledger.intact().await.unwrap());
    tokio::time::sleep(rtp_durability::api::health::CHECK_REUSED_FOR + Duration::from_millis(100))
        .await;
    assert_eq!(
        json(app.admin_get("/readyz").await).await["status"],
        "ready"
    );
    assert_eq!(app.admin_get("/status").await.status(), 200);

    // Every acknowledged transaction is back, with the bytes acknowledged.
    for (id, wal_ref, sha) in &acked {
        let rec = app.find(id).await.expect("restored from the WAL");
        assert_eq!(&rec.sha256.to_string(), sha, "{id}");
        assert_eq!(&rec.wal_ref.to_string(), wal_ref, "{id}");
    }
    // Other bytes under an acknowledged id: 409, as before the loss. The
    // same bytes: the existing transaction. The refused other bytes of the
    // 503 above were not restored in its place.
    let r = app
        .post_json(&json!({ "transaction_id": "before-0", "amount": 99 }))
        .await;
    assert_eq!(r.status(), 409, "other bytes under an acknowledged id");
    let r = app
        .post_json(&json!({ "transaction_id": "before-0", "amount": 0 }))
        .await;
    assert_eq!(r.status(), 200, "the same bytes again");
    // The vendor's retry of a refused POST and a brand-new one are accepted.
    for id in ["during-0", "after-0"] {
        let r = app
            .post_json(&json!({ "transaction_id": id, "amount": 1 }))
            .await;
        assert_eq!(r.status(), 202, "{id} accepted after the rebuild");
    }
    let c = app.services.ledger.counts().await.unwrap();
    assert_eq!(c.total(), 7, "the five restored and the two accepted after");
}

/// A loss a moment after an acknowledgement: the rebuild restores what is
/// missing however young (a regular pass leaves the youngest to ingest), so
/// other bytes under the id are a 409 once the ledger is marked again.
#[tokio::test]
async fn a_rebuild_restores_what_was_acknowledged_a_moment_before_the_loss() {
    let redis = OwnRedis::start();
    let app = spawn_app_with(AppOptions {
        redis_url: Some(redis.url()),
        // A production-sized lease: restored unfinished work waits it out,
        // and a regular pass would leave records this young alone.
        lock_secs: 60.0,
        downstream_timeout_secs: 10.0,
        ..Default::default()
    })
    .await;
    let acked = acknowledged_then_lost(&app, &redis, "young").await;
    let rebuilt = app
        .services
        .reconciler()
        .rebuild_if_lost(Duration::from_secs(3600))
        .await
        .unwrap();
    assert_eq!(rebuilt, Some(true));
    let rec = app.find("young").await.expect("restored, however young");
    assert_eq!(rec.sha256.to_string(), acked);
    let r = app
        .post_json(&json!({ "transaction_id": "young", "amount": 2 }))
        .await;
    assert_eq!(r.status(), 409, "other bytes under an acknowledged id");
}

/// A refusal for want of the intact mark whose journal note could not be
/// written (the journal down, or the process gone between the two): the
/// ledger remembers the refused WAL record in the same step as the
/// refusal, so the rebuild still restores the acknowledged bytes, not the
/// later refused ones.
#[tokio::test]
async fn a_refusal_whose_journal_note_failed_is_not_restored_over_the_acknowledged_bytes() {
    let redis = OwnRedis::start();
    let app = spawn_app_with(AppOptions {
        redis_url: Some(redis.url()),
        ..Default::default()
    })
    .await;
    let acked = acknowledged_then_lost(&app, &redis, "noted").await;
    // The journal cannot be written: a file where its hour directories go.
    let now = chrono::Utc::now();
    let blocked: Vec<std::path::PathBuf> = [now, now + chrono::Duration::hours(1)]
        .iter()
        .map(|t| {
            app.data_dir()
                .join("objects")
                .join(t.format("outcomes/v1/%Y/%m/%d/%H").to_string())
        })
        .collect();
    for p in &blocked {
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        if p.is_dir() {
            std::fs::remove_dir_all(p).unwrap();
        }
        std::fs::write(p, b"not a directory").unwrap();
    }
    let r = app
        .post_json(&json!({ "transaction_id": "noted", "amount": 2 }))
        .await;
    assert_eq!(r.status(), 503, "refused, its note not written");
    for p in &blocked {
        std::fs::remove_file(p).unwrap();
    }
    // Another replica rebuilds (this one's store took the blocking file
    // for its hour directory and remembers it as made).
    let other = rtp_durability::services::Services::build(&app.services.settings)
        .await
        .unwrap();
    let rebuilt = other
        .reconciler()
        .rebuild_if_lost(Duration::from_secs(3600))
        .await
        .unwrap();
    assert_eq!(rebuilt, Some(true));
    let rec = app.find("noted").await.expect("restored");
    assert_eq!(rec.sha256.to_string(), acked, "the acknowledged bytes");
    // The refusal only the ledger remembered is journaled now: a later loss
    // takes the ledger's memory, not the journal.
    let mut idx = rtp_durability::journal::JournalIndex::default();
    idx.refresh(
        &other.journal,
        now - chrono::Duration::hours(1),
        chrono::Utc::now() + chrono::Duration::hours(1),
        false,
    )
    .await
    .unwrap();
    let refused = idx.refused(rec.transaction_id.as_str());
    assert_eq!(refused.len(), 1, "{refused:?}");
    assert!(refused[0].1.is_some(), "names its WAL record: {refused:?}");
    assert_ne!(refused[0].0.to_string(), acked);
    let r = app
        .post_json(&json!({ "transaction_id": "noted", "amount": 2 }))
        .await;
    assert_eq!(r.status(), 409);
}

/// POSTs `id` (202), then the ledger's Redis loses everything (FLUSHALL):
/// the sha256 the receipt named.
async fn acknowledged_then_lost(
    app: &crate::support::TestApp,
    redis: &OwnRedis,
    id: &str,
) -> String {
    let r = app
        .post_json(&json!({ "transaction_id": id, "amount": 1 }))
        .await;
    assert_eq!(r.status(), 202);
    let acked = json(r).await["wal"]["sha256"].as_str().unwrap().to_owned();
    let mut conn = redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let _: () = redis::cmd("FLUSHALL").query_async(&mut conn).await.unwrap();
    acked
}
