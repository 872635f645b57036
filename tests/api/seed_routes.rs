//! The seed's routes keep the seed's shapes; health and listing.

use crate::support::{json, key, spawn_app};
use rtp_durability::transaction::State;
use serde_json::json;

#[tokio::test]
async fn metrics_are_json_for_plain_clients_and_prometheus_on_request() {
    let app = spawn_app().await;
    app.post_json(&json!({"transaction_id": "M-1"})).await;
    app.post_json(&json!({"transaction_id": "M-2", "_mock": {"script": ["400"]}}))
        .await;
    app.post_json(&json!({"transaction_id": "M-3"})).await;
    app.drain_until_terminal(&["M-1", "M-2", "M-3"]).await;
    let m = json(app.admin_get("/metrics").await).await;
    assert_eq!(
        m,
        json!({"pending": 0, "processing": 0, "success": 2, "failed": 0, "dead_letter": 1, "total": 3})
    );
    let text = app
        .client
        .get(format!("{}/metrics", app.address))
        .bearer_auth(crate::support::ADMIN_TOKEN)
        .header("Accept", "text/plain")
        .send()
        .await
        .unwrap();
    assert!(
        text.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain")
    );
    let text = text.text().await.unwrap();
    for needle in [
        "rtpd_ingest_requests_total{code=\"202\",caller=\"credentialed\"}",
        "rtpd_ingest_duration_seconds_bucket",
        "rtpd_wal_flush_duration_seconds_bucket",
        "rtpd_downstream_duration_seconds_bucket",
        "rtpd_downstream_calls_total{result=\"permanent\"}",
        "rtpd_ledger_transactions{state=\"success\"} 2",
    ] {
        assert!(text.contains(needle), "missing {needle} in\n{text}");
    }
}

#[tokio::test]
async fn status_transactions_and_replay_have_the_seed_shapes() {
    let app = spawn_app().await;
    let status = json(app.admin_get("/status").await).await;
    assert_eq!(status["status"], "healthy");
    assert_eq!(status["database"], "connected");
    assert!(status["timestamp"].is_string());

    app.post_json(&json!({"transaction_id": "RP-1", "_mock": {"script": ["400", "ok"]}}))
        .await;
    app.drain_until_terminal(&["RP-1"]).await;
    assert_eq!(app.state_of("RP-1").await, State::DeadLetter);

    let rows = json(app.admin_get("/transactions?limit=10").await).await;
    let row = &rows.as_array().unwrap()[0];
    assert_eq!(row["transaction_id"], "RP-1");
    assert_eq!(row["status"], "dead_letter");
    for k in ["retry_count", "error_message", "created_at", "updated_at"] {
        assert!(row.get(k).is_some(), "{k}");
    }

    let r = app.admin_post("/replay/RP-1", None).await;
    assert_eq!(r.status(), 202);
    assert_eq!(app.state_of("RP-1").await, State::Pending);
    app.drain_until_terminal(&["RP-1"]).await;
    assert_eq!(app.state_of("RP-1").await, State::Success);

    // A success is replayed only with force.
    let refused = app.admin_post("/v1/transactions/RP-1/replay", None).await;
    assert_eq!(refused.status(), 409);
    assert_eq!(json(refused).await["error"], "invalid_state");
    let forced = app
        .admin_post(
            "/v1/transactions/RP-1/replay",
            Some(
                json!({"force": true, "reason": "downstream lost it", "expected_state": "success"}),
            ),
        )
        .await;
    assert_eq!(forced.status(), 202);
    app.drain_until_terminal(&["RP-1"]).await;
    assert_eq!(app.mock_calls().await["by_key"][key("RP-1")]["calls"], 3);
    assert_eq!(app.admin_post("/replay/NOPE", None).await.status(), 404);
}

#[tokio::test]
async fn listing_filters_by_state_and_pages_with_a_cursor() {
    let app = spawn_app().await;
    for i in 0..7 {
        app.post_json(&json!({"transaction_id": format!("L-{i}")}))
            .await;
    }
    let mut seen = Vec::new();
    let mut path = "/v1/transactions?state=pending&limit=3".to_owned();
    loop {
        let page = json(app.admin_get(&path).await).await;
        for item in page["items"].as_array().unwrap() {
            assert_eq!(item["status"], "pending");
            seen.push(item["transaction_id"].as_str().unwrap().to_owned());
        }
        match page["next_cursor"].as_str() {
            Some(c) => path = format!("/v1/transactions?state=pending&limit=3&cursor={c}"),
            None => break,
        }
    }
    seen.sort();
    assert_eq!(seen.len(), 7);
    let bad = app.admin_get("/v1/transactions?state=done").await;
    assert_eq!(bad.status(), 400);
    assert_eq!(json(bad).await["error"], "invalid_state");
    assert_eq!(
        app.admin_get("/v1/transactions?limit=0").await.status(),
        400
    );
}

#[tokio::test]
async fn health_and_readiness() {
    let app = spawn_app().await;
    let h = app
        .client
        .get(format!("{}/healthz", app.address))
        .send()
        .await
        .unwrap();
    assert_eq!(h.status(), 200);
    let r = json(
        app.client
            .get(format!("{}/readyz", app.address))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(r["ready"], true);
    assert_eq!(r["status"], "ready");
    assert_eq!(r["dependencies"]["wal"], "connected");
    let nf = app
        .client
        .get(format!("{}/nope", app.address))
        .send()
        .await
        .unwrap();
    assert_eq!(nf.status(), 404);
    assert_eq!(json(nf).await["error"], "not_found");
}
