//! Probes and operator views: `/healthz` and `/readyz` are public for the
//! platform's probes; `/metrics` and `/status` need the admin token unless
//! `RTPD_PUBLIC_METRICS=true`, on the API and on the processor's health
//! server alike. Readiness says whether this replica is set up to answer
//! vendors; a backend outage after that keeps it in the load balancer, so
//! vendors get rtpd's own answer.

use crate::support::process::{OwnRedis, Proc, free_port, rtpd, wait_http_ok};
use crate::support::{ADMIN_TOKEN, AppOptions, TestApp, json, spawn_app, spawn_app_with};
use rtp_durability::auth::hash_secret;
use rtp_durability::config::{QueueKind, Secret};
use sb_test_broker::BrokerConfig;
use serde_json::{Value, json};
use std::process::Stdio;
use std::time::{Duration, Instant};

async fn get(app: &TestApp, path: &str, token: Option<&str>) -> reqwest::Response {
    let mut r = app.client.get(format!("{}{path}", app.address));
    if let Some(t) = token {
        r = r.bearer_auth(t);
    }
    r.send().await.unwrap()
}

/// GETs `path` until its status is `want`; returns the JSON body.
async fn wait_status(app: &TestApp, path: &str, want: u16, within: Duration) -> Value {
    let deadline = Instant::now() + within;
    loop {
        let r = get(app, path, Some(ADMIN_TOKEN)).await;
        let status = r.status().as_u16();
        let body: Value = r.json().await.unwrap_or(Value::Null);
        if status == want {
            return body;
        }
        assert!(
            Instant::now() < deadline,
            "{path}: still {status} after {within:?}: {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until the last dependency check is too old to answer `/readyz`
/// and `/status` (they reuse one for `CHECK_REUSED_FOR`), so the next
/// request checks again and sees an outage that began since.
async fn outlive_the_last_check() {
    tokio::time::sleep(rtp_durability::api::health::CHECK_REUSED_FOR + Duration::from_millis(100))
        .await;
}

#[tokio::test]
async fn metrics_and_status_need_the_admin_token_unless_public_metrics() {
    let app = spawn_app().await;
    for path in ["/healthz", "/readyz"] {
        assert_eq!(
            get(&app, path, None).await.status(),
            200,
            "{path} is public"
        );
    }
    for path in ["/metrics", "/status"] {
        let r = get(&app, path, None).await;
        assert_eq!(r.status(), 401, "{path} without a token");
        assert_eq!(json(r).await["error"], "unauthenticated");
        let vendor = app
            .client
            .get(format!("{}{path}", app.address))
            .header("X-Api-Key", crate::support::API_KEY)
            .send()
            .await
            .unwrap();
        assert_eq!(vendor.status(), 403, "{path} with a vendor key");
        assert_eq!(get(&app, path, Some(ADMIN_TOKEN)).await.status(), 200);
    }

    let open = spawn_app_with(AppOptions {
        configure: |s| s.public_metrics = true,
        ..Default::default()
    })
    .await;
    for path in ["/metrics", "/status", "/healthz", "/readyz"] {
        assert_eq!(get(&open, path, None).await.status(), 200, "{path}");
    }

    // RTPD_PUBLIC_HEALTH=false closes the probes too; the two are independent.
    let closed = spawn_app_with(AppOptions {
        configure: |s| s.public_health = false,
        ..Default::default()
    })
    .await;
    for path in ["/healthz", "/readyz", "/metrics", "/status"] {
        assert_eq!(get(&closed, path, None).await.status(), 401, "{path}");
        assert_eq!(
            get(&closed, path, Some(ADMIN_TOKEN)).await.status(),
            200,
            "{path}"
        );
    }
}

#[tokio::test]
async fn the_processors_health_server_keeps_metrics_and_status_for_admins() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let token = "processor-admin-token";
    let tokens = dir.path().join("admin-tokens");
    std::fs::write(&tokens, format!("ops:sha256:{}\n", hash_secret(token))).unwrap();
    let _processor = Proc(
        rtpd()
            .arg("processor")
            .env("RTPD_DATA_DIR", dir.path().join("data"))
            .env("RTPD_HTTP_ADDR", format!("127.0.0.1:{port}"))
            // As deployed: the processor gets the admin tokens, no vendor keys.
            .env("RTPD_ADMIN_TOKENS_FILE", &tokens)
            .env("RTPD_LOG_LEVEL", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let base = format!("http://127.0.0.1:{port}");
    wait_http_ok(&format!("{base}/healthz"), Duration::from_secs(20)).await;
    let client = reqwest::Client::new();
    assert_eq!(
        client
            .get(format!("{base}/readyz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    for path in ["/metrics", "/status"] {
        let open = client.get(format!("{base}{path}")).send().await.unwrap();
        assert_eq!(open.status(), 401, "{path} without a token");
        let wrong = client
            .get(format!("{base}{path}"))
            .bearer_auth("not-the-token")
            .send()
            .await
            .unwrap();
        assert_eq!(wrong.status(), 401, "{path} with a wrong token");
        let admin = client
            .get(format!("{base}{path}"))
            .bearer_auth(token)
            .send()
            .await
            .unwrap();
        assert_eq!(admin.status(), 200, "{path} with the admin token");
    }
}

#[tokio::test]
async fn a_service_bus_outage_keeps_the_replica_ready_and_ingest_answers_202() {
    let queue = format!("q-{}", uuid::Uuid::new_v4().simple());
    let broker = sb_test_broker::start(BrokerConfig {
        sas_key: Some("SAS_KEY_VALUE".into()),
        queues: vec![queue.clone()],
        ..Default::default()
    })
    .await
    .unwrap();
    let conn = broker.connection_string();
    let app = spawn_app_with(AppOptions {
        tweak: Some(Box::new(move |s| {
            s.queue = QueueKind::Servicebus;
            s.servicebus_connection_string = Some(Secret::from(conn.as_str()));
            s.servicebus_queue = queue;
        })),
        ..Default::default()
    })
    .await;
    let ready = wait_status(&app, "/readyz", 200, Duration::from_secs(10)).await;
    assert_eq!(ready["status"], "ready", "{ready}");
    let r = app.post_json(&json!({"transaction_id": "SB-UP"})).await;
    assert_eq!(r.status(), 202);
    assert_eq!(json(r).await["enqueued"], true);

    broker.shutdown();

    // The vendor still gets rtpd's answer: durable, and re-driven later.
    let deadline = Instant::now() + Duration::from_secs(10);
    let receipt = loop {
        let r = app.post_json(&json!({"transaction_id": "SB-DOWN"})).await;
        assert_eq!(r.status(), 202, "accepted while Service Bus is down");
        let body = json(r).await;
        if body["enqueued"] == false || Instant::now() > deadline {
            break body;
        }
    };
    assert_eq!(receipt["enqueued"], false, "{receipt}");
    assert!(receipt["wal"]["ref"].is_string(), "{receipt}");

    // Still ready (in the load balancer), and saying what is missing — once
    // the last dependency check (reused for a second) is past.
    outlive_the_last_check().await;
    let r = get(&app, "/readyz", None).await;
    assert_eq!(r.status(), 200);
    let ready = json(r).await;
    assert_eq!(ready["ready"], true, "{ready}");
    assert_eq!(ready["status"], "degraded", "{ready}");
    // An anonymous caller learns that the queue is down, not the broker's error text.
    assert_eq!(ready["dependencies"]["queue"], "unavailable", "{ready}");
    assert_eq!(ready["dependencies"]["wal"], "connected", "{ready}");
    let ready = json(get(&app, "/readyz", Some(ADMIN_TOKEN)).await).await;
    let detail = ready["dependencies"]["queue"].as_str().unwrap();
    assert!(
        detail.starts_with("unavailable: "),
        "an operator gets the detail: {ready}"
    );
    // /status reports every dependency, and the outage.
    let r = get(&app, "/status", Some(ADMIN_TOKEN)).await;
    assert_eq!(r.status(), 503);
    let status = json(r).await;
    assert_eq!(status["status"], "degraded", "{status}");
    assert!(
        status["dependencies"]["queue"]
            .as_str()
            .unwrap()
            .starts_with("unavailable"),
        "{status}"
    );
}

#[tokio::test]
async fn a_replica_turns_ready_once_it_reaches_its_wal_and_ledger_and_stays_in_through_an_outage() {
    // Redis is not there yet: the replica is up (live) but not ready.
    let mut redis = OwnRedis::reserve();
    let app = spawn_app_with(AppOptions {
        redis_url: Some(redis.url()),
        ..Default::default()
    })
    .await;
    assert_eq!(get(&app, "/healthz", None).await.status(), 200);
    let r = get(&app, "/readyz", None).await;
    assert_eq!(r.status(), 503, "never reached its ledger");
    let body = json(r).await;
    assert_eq!(body["ready"], false, "{body}");
    assert_eq!(body["status"], "starting", "{body}");
    assert!(
        body["dependencies"]["ledger"]
            .as_str()
            .unwrap()
            .starts_with("unavailable"),
        "{body}"
    );

    // The ledger it reaches is new: without its intact mark it registers
    // nothing (issue 12, N1) until the recovery watcher, as in `rtpd serve`,
    // rebuilds it from the WAL (empty here) and marks it.
    let (_stop, stop) = tokio::sync::watch::channel(false);
    tokio::spawn(rtp_durability::recovery::watch_dependencies(
        app.services.recovery_watch(false),
        stop,
    ));
    redis.launch();
    let ready = wait_status(&app, "/readyz", 200, Duration::from_secs(15)).await;
    assert_eq!(ready["status"], "ready", "{ready}");
    assert!(app.services.ledger.intact().await.unwrap());

    // Redis goes away after the replica was ready: vendors get rtpd's own 503
    // with Retry-After from this replica instead of losing it from the load
    // balancer; readiness and /status say the ledger is down.
    redis.kill();
    let r = app
        .post_json(&json!({"transaction_id": "LEDGER-DOWN"}))
        .await;
    assert_eq!(r.status(), 503);
    assert!(r.headers().contains_key("retry-after"));
    outlive_the_last_check().await;
    let r = get(&app, "/readyz", None).await;
    assert_eq!(r.status(), 200);
    let ready = json(r).await;
    assert_eq!(ready["status"], "degraded", "{ready}");
    assert!(
        ready["dependencies"]["ledger"]
            .as_str()
            .unwrap()
            .starts_with("unavailable"),
        "{ready}"
    );
    let status = get(&app, "/status", Some(ADMIN_TOKEN)).await;
    assert_eq!(status.status(), 503);
    assert_eq!(
        json(status).await["database"]
            .as_str()
            .map(|d| d.starts_with("unavailable")),
        Some(true)
    );
}
