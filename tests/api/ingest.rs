//! `POST /v1/transactions`: receipts, dedup, conflicts, and every bad input.

use crate::support::{API_KEY, json, key, spawn_app};
use rtp_durability::replay::load_record;
use rtp_durability::transaction::Sha256;
use serde_json::json;

#[tokio::test]
async fn new_transaction_gets_a_durability_receipt() {
    let app = spawn_app().await;
    // Exact bytes, with whitespace and key order a re-serializer would change.
    let body =
        "{ \"transaction_id\": \"TX-1\",\n  \"amount\": 10.50, \"z\": 1, \"a\": \"caf\u{e9}\" }";
    let r = app.post_raw(body, "application/json", Some(API_KEY)).await;
    assert_eq!(r.status(), 202);
    let receipt = json(r).await;
    assert_eq!(receipt["transaction_id"], "TX-1");
    assert_eq!(receipt["status"], "pending");
    assert_eq!(receipt["enqueued"], true);
    let sha = Sha256::of(body.as_bytes()).to_string();
    assert_eq!(receipt["wal"]["sha256"], sha);
    // The WAL record read back through its reference is byte-identical.
    let rec = load_record(
        &app.services.wal,
        &receipt["wal"]["ref"].as_str().unwrap().parse().unwrap(),
    )
    .await
    .unwrap();
    assert_eq!(rec.payload.as_bytes(), body.as_bytes());
    assert_eq!(rec.sha256, sha);
    assert_eq!(rec.source.vendor.as_deref(), Some("acme"));
    assert_eq!(rec.source.remote_addr.as_deref(), Some("127.0.0.1"));

    let got = json(app.get_tx("TX-1").await).await;
    assert_eq!(got["status"], "pending");
    assert_eq!(got["wal_ref"], receipt["wal"]["ref"]);
    assert_eq!(got["attempts"], 0);
}

#[tokio::test]
async fn identical_repeat_is_200_and_enqueued_once() {
    let app = spawn_app().await;
    let body = json!({"transaction_id": "TX-2", "amount": "1.00"});
    assert_eq!(app.post_json(&body).await.status(), 202);
    let again = app.post_json(&body).await;
    assert_eq!(again.status(), 200);
    let again = json(again).await;
    assert_eq!(again["duplicate"], true);
    assert_eq!(again["status"], "pending");
    app.drain_until_terminal(&["TX-2"]).await;
    app.assert_queue_empty().await;
    assert_eq!(app.mock_calls().await["by_key"][key("TX-2")]["calls"], 1);
    // After success a repeat reports the current state.
    assert_eq!(json(app.post_json(&body).await).await["status"], "success");
}

#[tokio::test]
async fn same_id_other_content_is_409_and_never_overwrites() {
    let app = spawn_app().await;
    assert_eq!(
        app.post_json(&json!({"transaction_id": "TX-3", "amount": "1"}))
            .await
            .status(),
        202
    );
    let r = app
        .post_json(&json!({"transaction_id": "TX-3", "amount": "2"}))
        .await;
    assert_eq!(r.status(), 409);
    let b = json(r).await;
    assert_eq!(b["error"], "conflict");
    assert_eq!(b["transaction_id"], "TX-3");
    let rec = app.record("TX-3").await;
    let wal = load_record(&app.services.wal, &rec.wal_ref).await.unwrap();
    assert!(wal.payload.contains("\"1\""), "original content kept");
}

#[tokio::test]
async fn idempotency_key_header_names_the_transaction() {
    let app = spawn_app().await;
    let r = app
        .client
        .post(format!("{}/v1/transactions", app.address))
        .header("Content-Type", "application/json")
        .header("X-Api-Key", API_KEY)
        .header("Idempotency-Key", "HDR-1")
        .body("{\"amount\":\"5\"}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    assert_eq!(json(r).await["transaction_id"], "HDR-1");
}

#[tokio::test]
async fn bad_input_gets_its_4xx_with_a_json_body_and_nothing_is_enqueued() {
    let app = spawn_app().await;
    let long_id = "x".repeat(129);
    let too_big = format!(
        "{{\"transaction_id\":\"BIG\",\"pad\":\"{}\"}}",
        "x".repeat(300 * 1024)
    );
    // (case, body, content type, API key, status, error code)
    type Case<'a> = (&'a str, Vec<u8>, &'a str, Option<&'a str>, u16, &'a str);
    let cases: Vec<Case> = vec![
        (
            "malformed json",
            b"{\"transaction_id\": ".to_vec(),
            "application/json",
            Some(API_KEY),
            400,
            "invalid_json",
        ),
        (
            "not an object",
            b"[1,2]".to_vec(),
            "application/json",
            Some(API_KEY),
            400,
            "not_an_object",
        ),
        (
            "missing id",
            b"{\"amount\":1}".to_vec(),
            "application/json",
            Some(API_KEY),
            400,
            "missing_transaction_id",
        ),
        (
            "empty id",
            b"{\"transaction_id\":\"\"}".to_vec(),
            "application/json",
            Some(API_KEY),
            400,
            "invalid_transaction_id",
        ),
        (
            "illegal id",
            b"{\"transaction_id\":\"a b/c\"}".to_vec(),
            "application/json",
            Some(API_KEY),
            400,
            "invalid_transaction_id",
        ),
        (
            "numeric id",
            b"{\"transaction_id\":42}".to_vec(),
            "application/json",
            Some(API_KEY),
            400,
            "invalid_transaction_id",
        ),
        (
            "oversized id",
            format!("{{\"transaction_id\":\"{long_id}\"}}").into_bytes(),
            "application/json",
            Some(API_KEY),
            400,
            "invalid_transaction_id",
        ),
        (
            "invalid utf-8",
            b"{\"transaction_id\":\"T\xff\"}".to_vec(),
            "application/json",
            Some(API_KEY),
            400,
            "invalid_utf8",
        ),
        (
            "deep nesting",
            format!(
                "{{\"transaction_id\":\"D\",\"x\":{}{}}}",
                "[".repeat(200),
                "]".repeat(200)
            )
            .into_bytes(),
            "application/json",
            Some(API_KEY),
            400,
            "invalid_json",
        ),
        (
            "wrong content type",
            b"{\"transaction_id\":\"CT\"}".to_vec(),
            "text/plain",
            Some(API_KEY),
            415,
            "unsupported_media_type",
        ),
        (
            "body over the limit",
            too_big.into_bytes(),
            "application/json",
            Some(API_KEY),
            413,
            "payload_too_large",
        ),
        (
            "no credentials",
            b"{\"transaction_id\":\"NA\"}".to_vec(),
            "application/json",
            None,
            401,
            "unauthenticated",
        ),
        (
            "wrong key",
            b"{\"transaction_id\":\"WK\"}".to_vec(),
            "application/json",
            Some("nope"),
            401,
            "unauthenticated",
        ),
    ];
    for (name, body, ct, key, status, code) in cases {
        let r = app.post_raw(body, ct, key).await;
        assert_eq!(r.status().as_u16(), status, "{name}");
        let b: serde_json::Value = r
            .json()
            .await
            .unwrap_or_else(|e| panic!("{name}: body is not JSON: {e}"));
        assert_eq!(b["error"], code, "{name}: {b}");
        assert!(
            b["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{name}"
        );
    }
    app.assert_queue_empty().await;
    assert_eq!(app.services.ledger.counts().await.unwrap().total(), 0);
    // Still healthy afterwards.
    assert_eq!(
        app.post_json(&json!({"transaction_id": "OK-1"}))
            .await
            .status(),
        202
    );
}

#[tokio::test]
async fn vendors_see_only_their_transactions_and_admins_route_needs_a_token() {
    let app = spawn_app().await;
    app.post_json(&json!({"transaction_id": "V-1"})).await;
    assert_eq!(app.get_tx("V-1").await.status(), 200);
    assert_eq!(app.get_tx("V-404").await.status(), 404);
    let listed = app
        .client
        .get(format!("{}/v1/transactions", app.address))
        .header("X-Api-Key", API_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(listed.status(), 403, "a vendor key is not an admin token");
    assert_eq!(json(listed).await["error"], "forbidden");
    assert_eq!(app.admin_get("/v1/transactions").await.status(), 200);
}
