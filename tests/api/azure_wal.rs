//! The service with its WAL on a real Azurite that dies under load: no 2xx
//! while the WAL is down, and everything acknowledged survives and is processed.

use crate::support::process::{free_port, start_azurite};
use crate::support::{AppOptions, json, spawn_app_with};
use rtp_durability::config::WalKind;
use rtp_durability::replay::load_record;
use rtp_durability::transaction::State;
use serde_json::json;
use std::{
    process::Command,
    time::{Duration, Instant},
};

use crate::support::process::AZURITE_DEV_KEY as DEV_KEY;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn azurite_outage_gets_503_never_2xx_and_loses_nothing_acknowledged() {
    let data = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut azurite = start_azurite(port, data.path());
    let conn = format!(
        "DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey={DEV_KEY};BlobEndpoint=http://127.0.0.1:{port}/devstoreaccount1;"
    );
    let app = spawn_app_with(AppOptions {
        tweak: Some(Box::new(move |s| {
            s.wal = WalKind::Azure;
            s.storage_connection_string = Some(conn.as_str().into());
            s.wal_container = format!("outage-{}", uuid::Uuid::new_v4().simple());
        })),
        ..Default::default()
    })
    .await;

    // The platform's readiness probe finds the replica ready.
    assert_eq!(app.admin_get("/readyz").await.status(), 200);

    // Under load before the outage: all acknowledged.
    let mut acked = Vec::new();
    let mut posts = tokio::task::JoinSet::new();
    for i in 0..40 {
        let body = json!({"transaction_id": format!("AZ-{i}"), "amount": i});
        let (client, url, key) = (
            app.client.clone(),
            format!("{}/v1/transactions", app.address),
            crate::support::API_KEY,
        );
        posts.spawn(async move {
            let r = client
                .post(url)
                .header("X-Api-Key", key)
                .json(&body)
                .send()
                .await
                .unwrap();
            (
                body,
                r.status().as_u16(),
                r.json::<serde_json::Value>().await.unwrap(),
            )
        });
    }
    while let Some(r) = posts.join_next().await {
        let (body, status, receipt) = r.unwrap();
        assert_eq!(status, 202, "{receipt}");
        acked.push((body, receipt));
    }

    // Azurite goes away: nothing gets a 2xx; each answer is 503 with Retry-After.
    // SIGTERM, not SIGKILL: Azurite (unlike Blob Storage) keeps its metadata in
    // memory and saves it every few seconds, so a kill -9 would lose blobs it
    // had acknowledged. The outage is what this test is about, not Azurite's
    // own durability.
    let stopped = Command::new("kill")
        .arg("-TERM")
        .arg(azurite.0.id().to_string())
        .status()
        .unwrap();
    assert!(stopped.success());
    azurite.0.wait().unwrap();
    let mut during = tokio::task::JoinSet::new();
    for i in 0..6 {
        let (client, url, key) = (
            app.client.clone(),
            format!("{}/v1/transactions", app.address),
            crate::support::API_KEY,
        );
        during.spawn(async move {
            client
                .post(url)
                .header("X-Api-Key", key)
                .json(&json!({"transaction_id": format!("DOWN-{i}")}))
                .send()
                .await
                .unwrap()
        });
    }
    while let Some(r) = during.join_next().await {
        let r = r.unwrap();
        assert_eq!(r.status(), 503, "no acknowledgement while the WAL is down");
        assert!(r.headers().contains_key("retry-after"));
        assert_eq!(json(r).await["error"], "unavailable");
    }
    // The replica stays in the load balancer, so vendors keep getting rtpd's
    // own 503 + Retry-After; readiness and /status say the WAL is down.
    let ready = app
        .client
        .get(format!("{}/readyz", app.address))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 200, "still ready: the outage is shared");
    let ready = json(ready).await;
    assert_eq!(ready["status"], "degraded", "{ready}");
    assert!(
        ready["dependencies"]["wal"]
            .as_str()
            .is_some_and(|w| w.starts_with("unavailable")),
        "readiness reports the WAL down: {ready}"
    );
    let status = app.admin_get("/status").await;
    assert_eq!(status.status(), 503, "/status reports the WAL down");

    // Back on the same data: ingest resumes, and everything acknowledged is there.
    let _azurite = start_azurite(port, data.path());
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = app.post_json(&json!({"transaction_id": "AFTER-1"})).await;
        if r.status() == 202 {
            break;
        }
        let status = r.status();
        let ping = app.services.wal.ping().await;
        assert!(
            Instant::now() < deadline,
            "ingest did not recover: {status} (WAL ping: {ping:?})"
        );
    }
    let mut ids = Vec::new();
    for (body, receipt) in &acked {
        let rec = load_record(
            &app.services.wal,
            &receipt["wal"]["ref"].as_str().unwrap().parse().unwrap(),
        )
        .await
        .unwrap();
        assert_eq!(
            rec.payload,
            body.to_string(),
            "byte-identical after the outage"
        );
        ids.push(rec.transaction_id);
    }
    let id_refs: Vec<&str> = ids.iter().map(|id| id.as_str()).collect();
    app.drain_until_terminal(&id_refs).await;
    for id in &ids {
        assert_eq!(app.state_of(id).await, State::Success, "{id}");
    }
    for i in 0..6 {
        assert!(
            app.services
                .ledger
                .get(&format!("DOWN-{i}"))
                .await
                .unwrap()
                .is_none(),
            "503s never registered"
        );
    }
}

#[tokio::test]
async fn the_largest_allowed_payload_round_trips_through_the_blob_wal() {
    let (conn, container) = crate::support::azurite_container();
    let app = spawn_app_with(AppOptions {
        tweak: Some(Box::new(move |s| {
            s.wal = WalKind::Azure;
            s.storage_connection_string = Some(conn.as_str().into());
            s.wal_container = container;
        })),
        ..Default::default()
    })
    .await;
    let limit = app.services.settings.max_body_bytes;
    let head = "{\"transaction_id\":\"MAX-1\",\"pad\":\"";
    let body = format!("{head}{}\"}}", "é".repeat((limit - head.len() - 2) / 2));
    let body = format!("{body}{}", " ".repeat(limit - body.len()));
    assert_eq!(body.len(), limit);
    let r = app
        .post_raw(
            body.clone(),
            "application/json",
            Some(crate::support::API_KEY),
        )
        .await;
    assert_eq!(r.status(), 202);
    let receipt = json(r).await;
    let rec = load_record(
        &app.services.wal,
        &receipt["wal"]["ref"].as_str().unwrap().parse().unwrap(),
    )
    .await
    .unwrap();
    assert_eq!(rec.payload.as_bytes(), body.as_bytes());
    assert_eq!(
        rec.sha256,
        rtp_durability::transaction::Sha256::of(body.as_bytes())
    );
    let over = app
        .post_raw(
            format!("{body} "),
            "application/json",
            Some(crate::support::API_KEY),
        )
        .await;
    assert_eq!(over.status(), 413);
}

/// The blob store, with the SDK's first try of each PUT having committed
/// already: before passing the PUT on, it stores `first_try` (the same bytes,
/// or other bytes) under the key, so the real PUT answers 409.
struct FirstTryCommitted {
    inner: rtp_durability::wal::azure::AzureBlobStore,
    same_bytes: bool,
    /// How many reads fail (unavailable) before they answer.
    failing_gets: std::sync::atomic::AtomicU32,
}

#[async_trait::async_trait]
impl rtp_durability::wal::store::ObjectStore for FirstTryCommitted {
    async fn put_new(
        &self,
        key: &str,
        body: bytes::Bytes,
        opts: &rtp_durability::wal::store::PutOptions,
    ) -> Result<(), rtp_durability::wal::store::StoreError> {
        let first_try = if self.same_bytes {
            body.clone()
        } else {
            bytes::Bytes::from_static(b"{\"someone\":\"else\"}\n")
        };
        self.inner.put_new(key, first_try, opts).await.unwrap();
        self.inner.put_new(key, body, opts).await
    }
    async fn get(&self, key: &str) -> Result<bytes::Bytes, rtp_durability::wal::store::StoreError> {
        use std::sync::atomic::Ordering;
        let failing = self
            .failing_gets
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
        if failing.is_ok() {
            return Err(rtp_durability::wal::store::StoreError::Unavailable(
                "read refused (test)".into(),
            ));
        }
        self.inner.get(key).await
    }
    async fn get_range(
        &self,
        key: &str,
        offset: u64,
        len: u64,
    ) -> Result<bytes::Bytes, rtp_durability::wal::store::StoreError> {
        self.inner.get_range(key, offset, len).await
    }
    async fn list(
        &self,
        prefix: &str,
    ) -> Result<Vec<rtp_durability::wal::store::ObjectInfo>, rtp_durability::wal::store::StoreError>
    {
        self.inner.list(prefix).await
    }
    async fn ping(&self) -> Result<(), rtp_durability::wal::store::StoreError> {
        self.inner.ping().await
    }
    fn describe(&self) -> String {
        "Azurite, first try committed".into()
    }
}

/// Issue 12 item 5: the SDK retries a blob PUT whose answer it lost; the
/// first try had committed, so the retry gets 409. The key is unique to the
/// flush: identical stored bytes are our own write (durable, acknowledged);
/// other bytes are an error, never an acknowledgement. The read that
/// compares them is retried like the put (simulation seed 11: the read
/// failed once and a durable record was answered 503).
#[tokio::test]
async fn wal_put_409_after_an_sdk_retry_is_success_only_for_identical_bytes() {
    use rtp_durability::wal::{GroupCommit, Log, WAL_PREFIX};
    use std::sync::Arc;
    for (same_bytes, failing_gets) in [(true, 0), (false, 0), (true, 2)] {
        let store = Arc::new(FirstTryCommitted {
            inner: crate::support::azurite_store().await,
            same_bytes,
            failing_gets: failing_gets.into(),
        });
        let log = Log::start(store.clone(), WAL_PREFIX, "item5", GroupCommit::default());
        let line = br#"{"transaction_id":"I5","amount":1}"#.to_vec();
        let result = log.append(line.clone(), chrono::Utc::now()).await;
        if same_bytes {
            let r = result.expect("a 409 over our own bytes is our durable write");
            assert_eq!(&log.read(&r).await.unwrap()[..], &line[..]);
        } else {
            let e = result.expect_err("a 409 over other bytes must not be acknowledged");
            assert!(e.to_string().contains("other content"), "{e}");
        }
    }
}
