//! The hostile-input suite: signatures, limits, rejected-call records and the
//! OpenAPI document. Each refusal is its documented 4xx with a JSON body,
//! nothing is enqueued, and the server keeps serving. (The basic bad-input
//! cases are in `ingest.rs`.)

use crate::support::{
    ADMIN_TOKEN, API_KEY, AppOptions, HMAC_SECRET, HMAC_VENDOR, json, now_unix, rejected_calls,
    spawn_app, spawn_app_with,
};
use rtp_durability::auth::sign;
use rtp_durability::replay::load_record;
use rtp_durability::transaction::Sha256;
use serde_json::{Value, json};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn assert_error(r: reqwest::Response, status: u16, code: &str, case: &str) -> Value {
    assert_eq!(r.status().as_u16(), status, "{case}");
    let b: Value = r
        .json()
        .await
        .unwrap_or_else(|e| panic!("{case}: body is not JSON: {e}"));
    assert_eq!(b["error"], code, "{case}: {b}");
    assert!(
        b["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{case}"
    );
    b
}

#[tokio::test]
async fn a_signed_transaction_is_accepted_and_attributed_to_its_vendor() {
    let app = spawn_app().await;
    let body = r#"{"transaction_id":"SIG-1","amount":"7.00"}"#;
    let r = app.post_signed(body, now_unix()).await;
    assert_eq!(r.status(), 202);
    let receipt = json(r).await;
    let rec = load_record(
        &app.services.wal,
        &receipt["wal"]["ref"].as_str().unwrap().parse().unwrap(),
    )
    .await
    .unwrap();
    assert_eq!(rec.source.vendor.as_deref(), Some(HMAC_VENDOR));
    assert_eq!(rec.payload, body);
    assert_eq!(
        app.record("SIG-1").await.vendor.as_deref(),
        Some(HMAC_VENDOR)
    );

    // A signed GET signs "METHOD path" instead of a body.
    let ts = now_unix();
    let get = |sig: String| {
        app.client
            .get(format!("{}/v1/transactions/SIG-1", app.address))
            .header("X-Rtpd-Vendor", HMAC_VENDOR)
            .header("X-Rtpd-Timestamp", ts.to_string())
            .header("X-Rtpd-Signature", sig)
            .send()
    };
    let r = get(sign(HMAC_SECRET.as_bytes(), ts, b"GET /v1/transactions/SIG-1").unwrap())
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(json(r).await["vendor"], HMAC_VENDOR);
    let r = get(sign(HMAC_SECRET.as_bytes(), ts, b"GET /v1/transactions/OTHER").unwrap())
        .await
        .unwrap();
    assert_error(r, 401, "unauthenticated", "signature for another path").await;
    // Another vendor's transaction looks absent.
    assert_eq!(app.get_tx("SIG-1").await.status(), 404);
}

#[tokio::test]
async fn bad_signatures_are_401_and_nothing_is_enqueued() {
    let app = spawn_app().await;
    let now = now_unix();
    let body = r#"{"transaction_id":"SIG-BAD"}"#;
    let good = sign(HMAC_SECRET.as_bytes(), now, body.as_bytes()).unwrap();

    let r = app.post_with_signature(body, now, "v1=zz").await;
    assert_error(r, 401, "unauthenticated", "malformed signature").await;
    let wrong = sign(b"not-the-secret-0123456789", now, body.as_bytes()).unwrap();
    let r = app.post_with_signature(body, now, &wrong).await;
    assert_error(r, 401, "unauthenticated", "wrong secret").await;
    let r = app
        .post_with_signature(r#"{"transaction_id":"SIG-OTHER"}"#, now, &good)
        .await;
    assert_error(r, 401, "unauthenticated", "signature of another body").await;
    let r = app.post_with_signature(body, now + 1, &good).await;
    assert_error(r, 401, "unauthenticated", "signature of another time").await;

    // A signature captured earlier and replayed after the window (5 min).
    let old = now - 301;
    let captured = sign(HMAC_SECRET.as_bytes(), old, body.as_bytes()).unwrap();
    let r = app.post_with_signature(body, old, &captured).await;
    let b = assert_error(r, 401, "unauthenticated", "stale timestamp").await;
    assert!(b["message"].as_str().unwrap().contains("window"), "{b}");
    let future = now + 301;
    let ahead = sign(HMAC_SECRET.as_bytes(), future, body.as_bytes()).unwrap();
    let r = app.post_with_signature(body, future, &ahead).await;
    assert_error(r, 401, "unauthenticated", "far-future timestamp").await;

    // An API-key vendor cannot sign, and an unknown vendor is unknown.
    for vendor in ["acme", "initech"] {
        let r = app
            .client
            .post(format!("{}/v1/transactions", app.address))
            .header("Content-Type", "application/json")
            .header("X-Rtpd-Vendor", vendor)
            .header("X-Rtpd-Timestamp", now.to_string())
            .header("X-Rtpd-Signature", &good)
            .body(body)
            .send()
            .await
            .unwrap();
        assert_error(r, 401, "unauthenticated", vendor).await;
    }
    app.assert_queue_empty().await;
    assert_eq!(app.services.ledger.counts().await.unwrap().total(), 0);

    // Within the window a signature is good exactly once.
    assert_eq!(
        app.post_with_signature(body, now, &good).await.status(),
        202
    );
    let r = app.post_with_signature(body, now, &good).await;
    let b = assert_error(r, 401, "unauthenticated", "reused signature").await;
    assert!(
        b["message"].as_str().unwrap().contains("already used"),
        "{b}"
    );
}

#[tokio::test]
async fn hostile_bodies_and_ids_get_their_4xx() {
    let app = spawn_app().await;
    let key = Some(API_KEY);
    type Case<'a> = (&'a str, Vec<u8>, &'a str, u16, &'a str);
    let cases: Vec<Case> = vec![
        (
            "duplicate key",
            br#"{"transaction_id":"DUP","amount":"1","amount":"1000"}"#.to_vec(),
            "application/json",
            400,
            "duplicate_key",
        ),
        (
            "duplicate nested key",
            br#"{"transaction_id":"DUP2","payee":{"iban":"A","iban":"B"}}"#.to_vec(),
            "application/json",
            400,
            "duplicate_key",
        ),
        (
            "duplicate transaction id",
            br#"{"transaction_id":"DUP3","transaction_id":"DUP4"}"#.to_vec(),
            "application/json",
            400,
            "duplicate_key",
        ),
        (
            "huge number",
            br#"{"transaction_id":"HUGE","amount":1e999999}"#.to_vec(),
            "application/json",
            400,
            "invalid_json",
        ),
        (
            "huge negative number",
            format!(
                r#"{{"transaction_id":"HUGE2","amount":-{}}}"#,
                "9".repeat(400)
            )
            .into_bytes(),
            "application/json",
            400,
            "invalid_json",
        ),
        (
            "empty body",
            Vec::new(),
            "application/json",
            400,
            "invalid_json",
        ),
        (
            "null",
            b"null".to_vec(),
            "application/json",
            400,
            "not_an_object",
        ),
        (
            "string",
            br#""TX-1""#.to_vec(),
            "application/json",
            400,
            "not_an_object",
        ),
        (
            "trailing garbage",
            br#"{"transaction_id":"TG"} {}"#.to_vec(),
            "application/json",
            400,
            "invalid_json",
        ),
        (
            "nul in id",
            b"{\"transaction_id\":\"A\\u0000B\"}".to_vec(),
            "application/json",
            400,
            "invalid_transaction_id",
        ),
        (
            "form content type",
            br#"{"transaction_id":"CT2"}"#.to_vec(),
            "application/x-www-form-urlencoded",
            415,
            "unsupported_media_type",
        ),
        (
            "json lookalike content type",
            br#"{"transaction_id":"CT3"}"#.to_vec(),
            "application/jsonx",
            415,
            "unsupported_media_type",
        ),
    ];
    for (name, body, ct, status, code) in cases {
        let r = app.post_raw(body, ct, key).await;
        assert_error(r, status, code, name).await;
    }

    // Ids in the Idempotency-Key header, and a missing content type.
    let post = |hdr: Option<(&'static str, String)>, ct: Option<&'static str>| {
        let mut r = app
            .client
            .post(format!("{}/v1/transactions", app.address))
            .header("X-Api-Key", API_KEY)
            .body(r#"{"amount":"1"}"#);
        if let Some((k, v)) = hdr {
            r = r.header(k, v);
        }
        if let Some(ct) = ct {
            r = r.header("Content-Type", ct);
        }
        r.send()
    };
    let json_ct = Some("application/json");
    for (case, value) in [
        ("empty idempotency key", String::new()),
        ("oversized idempotency key", "k".repeat(129)),
        ("illegal idempotency key", "../etc/passwd".into()),
    ] {
        let r = post(Some(("Idempotency-Key", value)), json_ct)
            .await
            .unwrap();
        assert_error(r, 400, "invalid_transaction_id", case).await;
    }
    let r = post(None, None).await.unwrap();
    assert_error(r, 415, "unsupported_media_type", "no content type").await;

    // Admin routes with vendor credentials are forbidden, signed or not.
    let ts = now_unix();
    let r = app
        .client
        .get(format!("{}/v1/transactions", app.address))
        .header("X-Rtpd-Vendor", HMAC_VENDOR)
        .header("X-Rtpd-Timestamp", ts.to_string())
        .header(
            "X-Rtpd-Signature",
            sign(HMAC_SECRET.as_bytes(), ts, b"GET /v1/transactions").unwrap(),
        )
        .send()
        .await
        .unwrap();
    assert_error(r, 403, "forbidden", "signed vendor on an admin route").await;
    let r = app
        .client
        .post(format!("{}/replay/ANY", app.address))
        .header("X-Api-Key", API_KEY)
        .send()
        .await
        .unwrap();
    assert_error(r, 403, "forbidden", "vendor key on replay").await;
    let r = app
        .client
        .get(format!("{}/v1/transactions", app.address))
        .bearer_auth(API_KEY)
        .send()
        .await
        .unwrap();
    assert_error(r, 401, "unauthenticated", "vendor key as a bearer token").await;

    // Unknown methods and routes are JSON too.
    let r = app
        .client
        .delete(format!("{}/v1/transactions", app.address))
        .send()
        .await
        .unwrap();
    assert_error(r, 405, "method_not_allowed", "DELETE").await;
    let r = app
        .client
        .get(format!("{}/nope", app.address))
        .send()
        .await
        .unwrap();
    assert_error(r, 404, "not_found", "unknown route").await;

    app.assert_queue_empty().await;
    assert_eq!(app.services.ledger.counts().await.unwrap().total(), 0);
    assert_eq!(
        app.post_json(&json!({"transaction_id": "STILL-OK"}))
            .await
            .status(),
        202
    );
}

#[tokio::test]
async fn oversized_headers_get_431() {
    let app = spawn_app().await;
    let r = app
        .client
        .post(format!("{}/v1/transactions", app.address))
        .header("Content-Type", "application/json")
        .header("X-Api-Key", API_KEY)
        .header("X-Pad", "p".repeat(20 * 1024))
        .body(r#"{"transaction_id":"HDR-BIG"}"#)
        .send()
        .await
        .unwrap();
    assert_error(r, 431, "headers_too_large", "20 KiB header").await;
    app.assert_queue_empty().await;
}

/// Sends `head` and then one byte of `trickle` every 200 ms until the server
/// answers or closes; returns what it answered and how long that took.
async fn trickle(address: String, head: String, trickle: &'static [u8]) -> (String, Duration) {
    let stream = TcpStream::connect(address.trim_start_matches("http://"))
        .await
        .unwrap();
    let (mut rd, mut wr) = stream.into_split();
    let started = Instant::now();
    let writer = tokio::spawn(async move {
        if wr.write_all(head.as_bytes()).await.is_err() {
            return;
        }
        for b in trickle {
            tokio::time::sleep(Duration::from_millis(200)).await;
            if wr.write_all(&[*b]).await.is_err() {
                return;
            }
        }
    });
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), rd.read_to_end(&mut answer)).await;
    writer.abort();
    assert!(read.is_ok(), "the server neither answered nor closed");
    (
        String::from_utf8_lossy(&answer).into_owned(),
        started.elapsed(),
    )
}

#[tokio::test]
async fn slow_clients_are_cut_off_and_others_are_still_served() {
    let app = spawn_app_with(AppOptions {
        configure: |s| s.request_timeout_secs = 1.0,
        ..Default::default()
    })
    .await;
    // A body trickling one byte at a time: 408 (or a closed connection) soon
    // after the 1 s allowance, long before the 40 bytes would arrive.
    let head = format!(
        "POST /v1/transactions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n\
         X-Api-Key: {API_KEY}\r\nContent-Length: 40\r\n\r\n{{"
    );
    let slow_body = tokio::spawn(trickle(
        app.address.clone(),
        head,
        b"\"transaction_id\":\"SLOW\",\"a\":\"bbbbbbbb\"}",
    ));
    // A slow request head.
    let slow_head = tokio::spawn(trickle(
        app.address.clone(),
        "POST /v1/transactions HTTP/1.1\r\nHost: t\r\n".into(),
        b"X-Api-Key: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    ));
    // Meanwhile others are served.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let t = Instant::now();
    assert_eq!(
        app.post_json(&json!({"transaction_id": "FAST-1"}))
            .await
            .status(),
        202
    );
    assert!(t.elapsed() < Duration::from_secs(1));

    for (case, task) in [("slow body", slow_body), ("slow head", slow_head)] {
        let (answer, took) = task.await.unwrap();
        eprintln!("{case}: answered after {took:?}: {answer:?}");
        assert!(
            answer.is_empty() || answer.starts_with("HTTP/1.1 408"),
            "{case}: {answer}"
        );
        assert!(took < Duration::from_secs(5), "{case} took {took:?}");
        if case == "slow body" && !answer.is_empty() {
            assert!(answer.contains("\"request_timeout\""), "{answer}");
        }
    }
    assert!(app.find("SLOW").await.is_none());
    assert_eq!(
        app.post_json(&json!({"transaction_id": "FAST-2"}))
            .await
            .status(),
        202
    );
}

#[tokio::test]
async fn a_vendor_over_its_rate_gets_429_with_retry_after() {
    let app = spawn_app_with(AppOptions {
        configure: |s| {
            s.vendor_rate_per_sec = 1;
            s.vendor_rate_burst = 2;
        },
        ..Default::default()
    })
    .await;
    assert_eq!(app.get_tx("R-1").await.status(), 404);
    assert_eq!(app.get_tx("R-1").await.status(), 404);
    let r = app.get_tx("R-1").await;
    let retry: u64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=2).contains(&retry), "{retry}");
    assert_error(r, 429, "rate_limited", "third request in a second").await;
    let r = app.post_json(&json!({"transaction_id": "R-2"})).await;
    assert_error(r, 429, "rate_limited", "ingest is limited too").await;
    // The limit is per vendor: another vendor and operators are unaffected.
    let r = app
        .post_signed(r#"{"transaction_id":"R-3"}"#, now_unix())
        .await;
    assert_eq!(r.status(), 202);
    assert_eq!(app.admin_get("/v1/transactions").await.status(), 200);
    app.drain_until_terminal(&["R-3"]).await;
    app.assert_queue_empty().await;
}

#[tokio::test]
async fn a_saturated_server_answers_503_with_retry_after() {
    let app = spawn_app_with(AppOptions {
        configure: |s| {
            s.max_in_flight = 1;
            s.request_timeout_secs = 10.0;
        },
        ..Default::default()
    })
    .await;
    // One request holds the only slot by sending its body slowly.
    let head = format!(
        "POST /v1/transactions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n\
         X-Api-Key: {API_KEY}\r\nContent-Length: 41\r\n\r\n{{\"transaction_id\":\"H\""
    );
    // 20 bytes at 200 ms each: the slot stays taken for about 4 s, long
    // enough to be seen on a loaded machine. A probe can take the slot just
    // as the holder arrives (the holder then gets the 503): start it again.
    let hold = || {
        tokio::spawn(trickle(
            app.address.clone(),
            head.clone(),
            b"                   }",
        ))
    };
    let mut holder = hold();
    let mut attempt = 0;
    let deadline = Instant::now() + Duration::from_secs(20);
    let busy = loop {
        if holder.is_finished() {
            let (answer, _) = (&mut holder).await.unwrap();
            assert!(
                answer.starts_with("HTTP/1.1 503"),
                "holder ended early: {answer}"
            );
            attempt += 1;
            holder = hold();
        }
        // A vendor's request: the probes have a pool of their own.
        let r = app.get_tx("H-PROBE").await;
        if r.status() == 503 {
            break r;
        }
        assert!(
            Instant::now() < deadline,
            "never saturated ({attempt} holders bounced)"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(busy.headers()["retry-after"], "1");
    assert_error(busy, 503, "unavailable", "saturated").await;
    let (answer, _) = holder.await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 202"), "{answer}");
    assert_eq!(
        app.client
            .get(format!("{}/healthz", app.address))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
}

#[tokio::test]
async fn rejected_calls_are_recorded_without_their_payload() {
    let app = spawn_app().await;
    let marker = format!("PAYLOAD-MARKER-{}", uuid::Uuid::new_v4().simple());
    let bad_json = format!(r#"{{"transaction_id":"REJ-1","note":"{marker}""#);
    app.post_raw(bad_json.clone(), "application/json", Some(API_KEY))
        .await;
    let signed_body = format!(r#"{{"transaction_id":"REJ-2","note":"{marker}"}}"#);
    let wrong = sign(
        b"not-the-secret-0123456789",
        now_unix(),
        signed_body.as_bytes(),
    )
    .unwrap();
    app.post_with_signature(&signed_body, now_unix(), &wrong)
        .await;
    app.post_raw(
        format!("{{\"note\":\"{marker}\"}}"),
        "text/plain",
        Some("a-wrong-key"),
    )
    .await;

    let (calls, raw) = rejected_calls(&app).await;
    assert!(!raw.contains(&marker), "a payload reached rejected/v1");
    assert!(
        !raw.contains("a-wrong-key"),
        "a presented key reached rejected/v1"
    );
    let find = |reason: &str| {
        calls
            .iter()
            .find(|c| c.reason == reason)
            .unwrap_or_else(|| panic!("no {reason} record in {calls:?}"))
            .clone()
    };
    let c = find("invalid_json");
    assert_eq!(c.status, 400);
    assert_eq!(c.vendor.as_deref(), Some("acme"));
    assert_eq!(c.size, Some(bad_json.len() as u64));
    assert_eq!(
        c.sha256.as_deref(),
        Some(Sha256::of(bad_json.as_bytes()).to_string().as_str())
    );
    assert_eq!(c.remote_addr.as_deref(), Some("127.0.0.1"));
    assert_eq!(
        (c.method.as_str(), c.path.as_str()),
        ("POST", "/v1/transactions")
    );
    let c = find("bad_signature");
    assert_eq!(c.status, 401);
    assert_eq!(c.vendor, None);
    assert_eq!(c.claimed_vendor.as_deref(), Some(HMAC_VENDOR));
    assert_eq!(
        c.sha256.as_deref(),
        Some(Sha256::of(signed_body.as_bytes()).to_string().as_str())
    );
    let c = find("bad_api_key");
    assert_eq!(c.status, 401);
    assert_eq!(c.sha256, None, "refused before the body was read");
    app.assert_queue_empty().await;
}

#[tokio::test]
async fn the_openapi_document_matches_the_routes_served() {
    let app = spawn_app().await;
    let r = app
        .client
        .get(format!("{}/openapi.json", app.address))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let doc: Value = r.json().await.unwrap();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    let mut documented = Vec::new();
    for (path, ops) in doc["paths"].as_object().unwrap() {
        for method in ops.as_object().unwrap().keys() {
            documented.push((method.to_ascii_uppercase(), path.clone()));
        }
    }
    // Every documented operation reaches a handler (not the 404/405 fallbacks).
    for (method, path) in &documented {
        let url = format!("{}{}", app.address, path.replace("{id}", "OPENAPI-1"));
        let r = app
            .client
            .request(method.parse().unwrap(), url)
            .bearer_auth(ADMIN_TOKEN)
            .header("Content-Type", "application/json")
            .body("{}")
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        let body: Value = r.json().await.unwrap_or(Value::Null);
        assert_ne!(status, 405, "{method} {path}");
        assert!(
            !(status == 404 && body["message"] == "no such route"),
            "{method} {path} is documented but not served"
        );
    }
    // Every served route is documented.
    for (method, path) in rtp_durability::api::served_routes() {
        assert!(
            documented.contains(&(method.to_string(), path.to_owned())),
            "{method} {path} is served but not documented"
        );
    }
}

/// A signed request refused after its signature was verified (a 429 here;
/// a 503 when the vendors' pool is full or the WAL is down) did not happen:
/// the vendor's byte-identical retry must be accepted, not refused as a
/// replayed signature — a client may take that 401 as final and drop the
/// payment.
/// An app whose vendor may send one request a second: `<prefix>-1` signed
/// at `ts` is accepted, `<prefix>-2` signed at `ts` is refused with 429
/// after its signature verified; returned once the rate allows again.
async fn refused_after_verifying(prefix: &str) -> (crate::support::TestApp, i64) {
    let app = spawn_app_with(AppOptions {
        configure: |s| {
            s.vendor_rate_per_sec = 1;
            s.vendor_rate_burst = 1;
        },
        ..Default::default()
    })
    .await;
    let ts = now_unix();
    let first = format!(r#"{{"transaction_id":"{prefix}-1"}}"#);
    let r = app.post_signed(&first, ts).await;
    assert_eq!(r.status(), 202);
    let second = format!(r#"{{"transaction_id":"{prefix}-2"}}"#);
    let r = app.post_signed(&second, ts).await;
    assert_error(r, 429, "rate_limited", "second request in a second").await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    (app, ts)
}

#[tokio::test]
async fn a_signed_request_refused_after_verification_can_be_retried_as_is() {
    let (app, ts) = refused_after_verifying("RS").await;
    let body = r#"{"transaction_id":"RS-2"}"#;
    let r = app.post_signed(body, ts).await;
    assert_eq!(r.status(), 202, "{}", r.text().await.unwrap());
    // Once accepted, the same signature is a replay again.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let r = app.post_signed(body, ts).await;
    assert_error(r, 401, "unauthenticated", "replayed accepted signature").await;
    app.drain_until_terminal(&["RS-1", "RS-2"]).await;
}

/// Issue 20, second review's finding 4: a signed request refused after it
/// verified (429, 503) has its signature forgotten, so the vendor's retry
/// is not a replay (a 401 may be read as final). From another address the
/// retry is accepted too (a vendor may send from several) but vouches for
/// nothing — it may be a captured copy (`auth::tests`); and once used, the
/// signature is a replay again.
#[tokio::test]
async fn a_refused_signed_request_may_be_retried_once_from_another_address() {
    let (app, ts) = refused_after_verifying("RA").await;
    let body = r#"{"transaction_id":"RA-2"}"#;
    let sig = sign(HMAC_SECRET.as_bytes(), ts, body.as_bytes()).unwrap();
    let elsewhere = reqwest::Client::builder()
        .local_address(std::net::IpAddr::from([127, 0, 0, 9]))
        .build()
        .unwrap();
    let from_elsewhere = || {
        elsewhere
            .post(format!("{}/v1/transactions", app.address))
            .header("Content-Type", "application/json")
            .header("X-Rtpd-Vendor", HMAC_VENDOR)
            .header("X-Rtpd-Timestamp", ts.to_string())
            .header("X-Rtpd-Signature", &sig)
            .body(body)
            .send()
    };
    let r = from_elsewhere().await.unwrap();
    assert_eq!(
        r.status(),
        202,
        "the retry from another address: {}",
        r.text().await.unwrap()
    );
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let r = from_elsewhere().await.unwrap();
    assert_error(r, 401, "unauthenticated", "used once more already").await;
    let r = app.post_with_signature(body, ts, &sig).await;
    assert_error(r, 401, "unauthenticated", "used once more already").await;
    app.drain_until_terminal(&["RA-1", "RA-2"]).await;
}
