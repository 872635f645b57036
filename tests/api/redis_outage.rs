//! Redis restarted without persistence under a running service: while it is
//! down the service says so (ingest 503 + Retry-After, never a 2xx; readiness
//! stays 200 and reports the ledger down, so the replica keeps answering
//! vendors itself); when it is back (empty) the service recovers by itself, and every
//! transaction acknowledged before the outage is still in the WAL although
//! the ledger has forgotten it — the gap a ledger rebuild closes.

use crate::support::process::OwnRedis;
use crate::support::{AppOptions, json, spawn_app_with};
use rtp_durability::replay::load_record;
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
    loop {
        let r = app.admin_get("/status").await;
        if r.status() == 200 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the ledger did not come back: {}",
            json(r).await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        json(app.admin_get("/readyz").await).await["status"],
        "ready"
    );
    // The vendor's retry of a refused POST and a brand-new one are accepted.
    for id in ["during-0", "after-0"] {
        let r = app
            .post_json(&json!({ "transaction_id": id, "amount": 1 }))
            .await;
        assert_eq!(r.status(), 202, "{id} accepted after recovery");
    }

    // The gap: the ledger forgot what it acknowledged; the WAL did not.
    for (id, wal_ref, sha) in &acked {
        assert!(
            app.find(id).await.is_none(),
            "{id}: the restarted Redis is empty"
        );
        let rec = load_record(&app.services.wal, &wal_ref.parse().unwrap())
            .await
            .expect("acknowledged record is in the WAL");
        assert_eq!(&rec.transaction_id, id);
        assert_eq!(&rec.sha256, sha);
    }
    let c = app.services.ledger.counts().await.unwrap();
    assert_eq!(c.total(), 2, "only what arrived after the restart");
}
