//! Recovery scenarios, one per row of the seed's table plus poison messages,
//! with real `rtpd` processes, a real `rtpd mock-downstream` and the ops
//! commands an on-call engineer would run. Each ends with the same audit:
//! every acknowledged id is `success` or `dead_letter`, and the downstream saw
//! at most one success per idempotency key.

use rtp_durability::envelope::{Delivery, Envelope};
use rtp_durability::queue::local::{LocalQueue, LocalQueueOptions};
use rtp_durability::queue::{OutgoingMessage, Queue, Subqueue};
use rtp_durability::transaction::{Registration, TransactionId};
use serde_json::{Value, json};
use std::{
    collections::BTreeMap,
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use crate::support::process::{
    Proc, free_port, mock_calls, poll_json, read_journal, rtpd, start_mock, wait_http_ok,
};

/// One deployment: a data directory, an API port and the mock downstream.
struct Site {
    dir: std::path::PathBuf,
    api_port: u16,
    mock_port: u16,
    /// Extra environment for every `rtpd` process of this site.
    env: Vec<(String, String)>,
    /// The schema of the site's ledger on the test PostgreSQL, if it has one.
    postgres_schema: Option<String>,
}

impl Site {
    fn new(dir: &Path, mock_port: u16) -> Site {
        Site {
            dir: dir.to_owned(),
            api_port: free_port(),
            mock_port,
            env: Vec::new(),
            postgres_schema: None,
        }
    }

    /// The same, with its ledger on a fresh schema of the test PostgreSQL.
    async fn on_postgres(dir: &Path, mock_port: u16) -> Site {
        let (url, schema) = crate::support::postgres::new_schema().await;
        let mut site = Site::new(dir, mock_port);
        site.env.push(("RTPD_LEDGER".into(), "postgres".into()));
        site.env.push(("RTPD_POSTGRES_URL".into(), url));
        site.postgres_schema = Some(schema);
        site
    }

    fn base(&self) -> String {
        format!("http://127.0.0.1:{}", self.api_port)
    }

    fn command(&self) -> Command {
        let mut c = rtpd();
        c.env("RTPD_DATA_DIR", &self.dir)
            .env("RTPD_AUTH", "none")
            .env("RTPD_INSTANCE_ID", "site-a")
            .env("RTPD_HTTP_ADDR", format!("127.0.0.1:{}", self.api_port))
            .env(
                "RTPD_DOWNSTREAM_URL",
                format!("http://127.0.0.1:{}/process", self.mock_port),
            )
            .env("RTPD_LOCK_DURATION_SECS", "2")
            .env("RTPD_DOWNSTREAM_TIMEOUT_SECS", "1")
            .env("RTPD_MAX_DELIVERY_COUNT", "50")
            .env("RTPD_BACKOFF_BASE_SECS", "0.1")
            .env("RTPD_BACKOFF_MAX_SECS", "0.5")
            .env("RTPD_RECONCILE_INTERVAL_SECS", "0.5")
            .env("RTPD_RECONCILE_PENDING_AFTER_SECS", "1")
            .env("RTPD_LOG_LEVEL", "warn");
        for (k, v) in &self.env {
            c.env(k, v);
        }
        c
    }

    /// `rtpd serve` or `rtpd api`, answering on its port.
    async fn start(&self, part: &str) -> Proc {
        let p = Proc(
            self.command()
                .arg(part)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        );
        wait_http_ok(&format!("{}/healthz", self.base()), Duration::from_secs(20)).await;
        p
    }

    /// Runs an ops command to the end; returns its stdout.
    fn ops(&self, args: &[&str]) -> String {
        let out = self.command().args(args).output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "rtpd {args:?} failed: {stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        stdout
    }

    /// Loses the ledger: its files, or everything in its PostgreSQL schema.
    async fn delete_ledger(&self) {
        if let Some(schema) = &self.postgres_schema {
            crate::support::postgres::wipe_schema(schema).await;
            return;
        }
        for f in ["ledger.db", "ledger.db-wal", "ledger.db-shm"] {
            let _ = std::fs::remove_file(self.dir.join(f));
        }
        assert!(!self.dir.join("ledger.db").exists());
    }

    fn queue(&self) -> LocalQueue {
        LocalQueue::open(&self.dir.join("queue.db"), LocalQueueOptions::default()).unwrap()
    }
}

fn body_of(id: &str, extra: &Value) -> Value {
    let mut body = json!({"transaction_id": id, "amount": "10.00", "currency": "USD"});
    if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
        b.extend(e.clone());
    }
    body
}

/// POSTs transactions; returns the ids acknowledged with 202.
async fn ingest(site: &Site, prefix: &str, n: usize, extra: Value) -> Vec<String> {
    let client = reqwest::Client::new();
    let mut acked = Vec::new();
    for i in 0..n {
        let id = format!("{prefix}-{i:04}");
        let body = body_of(&id, &extra);
        let r = client
            .post(format!("{}/v1/transactions", site.base()))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 202, "{id}: {}", r.text().await.unwrap());
        acked.push(id);
    }
    acked
}

async fn status_of(site: &Site, id: &str) -> String {
    let v: Value = reqwest::get(format!("{}/v1/transactions/{id}", site.base()))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    v["status"].as_str().unwrap_or("missing").to_owned()
}

async fn wait_until_finished(site: &Site, ids: &[String], within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let mut open = Vec::new();
        for id in ids {
            let s = status_of(site, id).await;
            if s != "success" && s != "dead_letter" {
                open.push(format!("{id}={s}"));
            }
        }
        if open.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "not finished within {within:?}: {open:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Every acknowledged id is `success`, and the downstream saw exactly one success for it.
async fn audit(site: &Site, ids: &[String]) -> Value {
    let calls = mock_calls(site.mock_port).await;
    assert_eq!(calls["duplicate_successes"], 0, "{calls}");
    assert_eq!(calls["concurrent_overlaps"], 0, "{calls}");
    assert_eq!(calls["calls_without_key"], 0, "{calls}");
    for id in ids {
        assert_eq!(status_of(site, id).await, "success", "{id}");
        assert_eq!(calls["by_key"][id]["successes"], 1, "{id}: {calls}");
    }
    calls
}

fn calls_per_key(calls: &Value) -> BTreeMap<String, u64> {
    calls["by_key"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| (k.clone(), v["calls"].as_u64().unwrap_or(0)))
                .collect()
        })
        .unwrap_or_default()
}

/// Seed row "Queue fails": the queue loses every message after ingest. The
/// reconciler re-drives from the WAL; each transaction succeeds exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn queue_loss_is_redriven_from_the_wal() {
    let dir = tempfile::tempdir().unwrap();
    let (_mock, mock_port) = start_mock(&[]).await;
    let site = Site::new(dir.path(), mock_port);

    // Ingest only: nothing processes yet.
    let mut api = site.start("api").await;
    let ids = ingest(&site, "QLOSS", 25, json!({})).await;
    api.kill9();

    let purged = site.queue().purge(Subqueue::Main).await.unwrap();
    assert_eq!(
        purged,
        ids.len(),
        "every message was in the queue, then lost"
    );

    let _serve = site.start("serve").await;
    wait_until_finished(&site, &ids, Duration::from_secs(60)).await;
    let calls = audit(&site, &ids).await;
    for id in &ids {
        assert_eq!(calls["by_key"][id]["calls"], 1, "{id}: exactly once");
    }
}

/// A re-drive from the WAL is an operation of its own, linked to the
/// payment's trace through the WAL record's `trace_parent`, as an operator
/// replay is; the processor's attempt continues the re-drive's trace.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_redrive_links_to_the_payments_trace() {
    let receiver = crate::support::otlp::OtlpReceiver::start();
    let dir = tempfile::tempdir().unwrap();
    let (_mock, mock_port) = start_mock(&[]).await;
    let mut site = Site::new(dir.path(), mock_port);
    site.env
        .push(("OTEL_EXPORTER_OTLP_ENDPOINT".into(), receiver.url.clone()));
    site.env
        .push(("OTEL_BSP_SCHEDULE_DELAY".into(), "100".into()));

    let mut api = site.start("api").await;
    let ids = ingest(&site, "LINK", 1, json!({})).await;
    let is_ingest = |s: &crate::support::otlp::Span| s.name == "POST /v1/transactions";
    receiver
        .wait_for(Duration::from_secs(30), "the ingest span", |r| {
            r.spans().iter().any(is_ingest)
        })
        .await;
    api.kill9();
    site.queue().purge(Subqueue::Main).await.unwrap();

    let _serve = site.start("serve").await;
    wait_until_finished(&site, &ids, Duration::from_secs(60)).await;
    receiver
        .wait_for(Duration::from_secs(30), "the re-drive's attempt", |r| {
            let spans = r.spans();
            spans.iter().any(|s| {
                s.name == "redrive"
                    && spans
                        .iter()
                        .any(|p| p.name == "process" && p.trace_id == s.trace_id)
            })
        })
        .await;
    let spans = receiver.spans();
    let ingest = spans.iter().find(|s| is_ingest(s)).unwrap();
    let redrive = spans.iter().find(|s| s.name == "redrive").unwrap();
    assert_ne!(redrive.trace_id, ingest.trace_id, "an operation of its own");
    assert_eq!(redrive.parent_span_id, "", "a root span");
    assert!(
        redrive
            .links
            .contains(&format!("{}/{}", ingest.trace_id, ingest.span_id)),
        "linked to the payment's POST: {:?}",
        redrive.links
    );
    assert_eq!(redrive.attributes["transaction_id"], ids[0]);
}

/// Seed row "Processor fails mid-run": the processor is killed during the
/// downstream call. The restarted one retries safely: one success, one key.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn processor_killed_mid_call_retries_safely() {
    let dir = tempfile::tempdir().unwrap();
    let (_mock, mock_port) = start_mock(&["--latency-ms", "1500"]).await;
    let mut site = Site::new(dir.path(), mock_port);
    site.env
        .push(("RTPD_DOWNSTREAM_TIMEOUT_SECS".into(), "5".into()));

    let mut serve = site.start("serve").await;
    let ids = ingest(&site, "KILL", 3, json!({})).await;
    // Kill -9 while calls are in flight at the downstream.
    poll_json(
        &format!("http://127.0.0.1:{mock_port}/calls"),
        Duration::from_secs(20),
        |c| c["total_calls"].as_u64().unwrap_or(0) > 0,
    )
    .await;
    serve.kill9();
    let in_flight = mock_calls(mock_port).await;
    assert!(
        ids.iter()
            .any(|id| in_flight["by_key"][id]["successes"].as_u64().unwrap_or(0) == 0),
        "the kill happened before every call finished: {in_flight}"
    );

    let _serve = site.start("serve").await;
    wait_until_finished(&site, &ids, Duration::from_secs(90)).await;
    let calls = audit(&site, &ids).await;
    assert_eq!(
        calls["keys"],
        ids.len(),
        "one idempotency key per transaction"
    );
}

/// Seed row "Redis corruption": the ledger is deleted mid-run. `rebuild-ledger`
/// and the reconciler recover everything; nothing that had succeeded reaches
/// the downstream again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ledger_loss_is_rebuilt_without_redelivery() {
    let dir = tempfile::tempdir().unwrap();
    let (_mock, mock_port) = start_mock(&["--latency-ms", "20"]).await;
    rebuilt_without_redelivery(Site::new(dir.path(), mock_port), mock_port).await;
}

/// The same with the ledger on PostgreSQL, its tables dropped mid-run.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_ledger_loss_is_rebuilt_without_redelivery() {
    let dir = tempfile::tempdir().unwrap();
    let (_mock, mock_port) = start_mock(&["--latency-ms", "20"]).await;
    rebuilt_without_redelivery(Site::on_postgres(dir.path(), mock_port).await, mock_port).await;
}

async fn rebuilt_without_redelivery(site: Site, mock_port: u16) {
    let mut serve = site.start("serve").await;
    let done = ingest(&site, "LDONE", 15, json!({})).await;
    wait_until_finished(&site, &done, Duration::from_secs(60)).await;
    let before = calls_per_key(&mock_calls(mock_port).await);
    // More arrive; the ledger dies while they are being processed.
    let mid = ingest(&site, "LMID", 15, json!({})).await;
    serve.kill9();
    site.delete_ledger().await;

    let dry = site.ops(&["rebuild-ledger", "--from", "1h", "--dry-run", "--quiet"]);
    assert!(dry.contains("(dry run)"), "{dry}");
    let out = site.ops(&["rebuild-ledger", "--from", "1h", "--quiet"]);
    assert!(out.contains("ledger now:"), "{out}");
    // Finished transactions are back as finished before anything runs again.
    let svc_view = site.start("api").await;
    for id in &done {
        assert_eq!(status_of(&site, id).await, "success", "{id} after rebuild");
    }
    drop(svc_view);

    let _serve = site.start("serve").await;
    let all: Vec<String> = done.iter().chain(&mid).cloned().collect();
    wait_until_finished(&site, &all, Duration::from_secs(60)).await;
    let calls = audit(&site, &all).await;
    let after = calls_per_key(&calls);
    for id in &done {
        assert_eq!(after[id], before[id], "{id} reached the downstream again");
    }
}

/// Ledger lost with no operator around: the processor restores what it finds
/// missing from the journal, and the reconciler restores the rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ledger_loss_heals_itself_from_the_journal() {
    let dir = tempfile::tempdir().unwrap();
    let (_mock, mock_port) = start_mock(&[]).await;
    let site = Site::new(dir.path(), mock_port);

    let mut serve = site.start("serve").await;
    let done = ingest(&site, "HEAL", 10, json!({})).await;
    wait_until_finished(&site, &done, Duration::from_secs(60)).await;
    let before = calls_per_key(&mock_calls(mock_port).await);
    let rec: Value = reqwest::get(format!("{}/v1/transactions/{}", site.base(), done[0]))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    serve.kill9();
    site.delete_ledger().await;
    // A stray copy of a finished transaction is still queued (a re-drive, or
    // a message whose settle was lost in the crash).
    let reg = Registration {
        transaction_id: TransactionId::parse(&done[0]).unwrap(),
        sha256: rec["sha256"].as_str().unwrap().into(),
        wal_ref: rec["wal_ref"].as_str().unwrap().parse().unwrap(),
        vendor: None,
        received_at: serde_json::from_value(rec["created_at"].clone()).unwrap(),
        expires_at: None,
    };
    let payload = serde_json::to_vec(&body_of(&done[0], &json!({}))).unwrap();
    let q = site.queue();
    q.send(vec![
        Envelope::new(reg, payload.into(), Delivery::Redrive("stray".into())).to_message(),
    ])
    .await
    .unwrap();
    drop(q);

    let _serve = site.start("serve").await;
    wait_until_finished(&site, &done, Duration::from_secs(60)).await;
    let after = calls_per_key(&audit(&site, &done).await);
    assert_eq!(after, before, "nothing reached the downstream again");
}

/// Seed row "Region loss", simulated: only the (geo-replicated) WAL and
/// journal survive. A fresh ledger and a fresh queue in the second region
/// recover every unfinished transaction, and finished ones stay finished.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn region_loss_recovers_from_the_surviving_wal() {
    let primary = tempfile::tempdir().unwrap();
    let (_mock, mock_port) = start_mock(&["--latency-ms", "400"]).await;
    let mut site = Site::new(primary.path(), mock_port);
    site.env
        .push(("RTPD_PROCESSOR_CONCURRENCY".into(), "1".into()));
    let mut serve = site.start("serve").await;
    let ids = ingest(&site, "REGION", 30, json!({})).await;
    // Let some finish, then lose the region.
    let deadline = Instant::now() + Duration::from_secs(30);
    let succeeded = loop {
        let mut succeeded = Vec::new();
        for id in &ids {
            if status_of(&site, id).await == "success" {
                succeeded.push(id.clone());
            }
        }
        if succeeded.len() >= 3 {
            break succeeded;
        }
        assert!(Instant::now() < deadline, "nothing finished");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    serve.kill9();
    let before = calls_per_key(&mock_calls(mock_port).await);
    assert!(
        succeeded.len() < ids.len(),
        "some were unfinished at the loss"
    );

    // The secondary region: a copy of the blob container and nothing else.
    let secondary = tempfile::tempdir().unwrap();
    copy_dir(
        &primary.path().join("objects"),
        &secondary.path().join("objects"),
    );
    drop(site);
    let site = Site::new(secondary.path(), mock_port);
    assert!(!secondary.path().join("ledger.db").exists());
    assert!(!secondary.path().join("queue.db").exists());
    let out = site.ops(&["rebuild-ledger", "--from", "2h", "--quiet"]);
    assert!(out.contains("ledger now:"), "{out}");
    let _serve = site.start("serve").await;
    wait_until_finished(&site, &ids, Duration::from_secs(90)).await;
    let after = calls_per_key(&audit(&site, &ids).await);
    for id in &succeeded {
        assert_eq!(
            after[id], before[id],
            "{id} had succeeded and reached the downstream again"
        );
    }
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let target = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), &target).unwrap();
        }
    }
}

/// Poison: an undecodable message and a payload the downstream rejects are
/// dead-lettered with reasons, visible in `rtpd dlq ls`; once the cause is
/// fixed, a replay succeeds; a purge needs `--yes` and is journaled.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn poison_is_dead_lettered_listed_and_replayed() {
    let dir = tempfile::tempdir().unwrap();
    let (_mock, mock_port) = start_mock(&[]).await;
    let site = Site::new(dir.path(), mock_port);
    let _serve = site.start("serve").await;

    let ids = ingest(
        &site,
        "POISON",
        1,
        json!({"_mock": {"script": ["400", "ok"]}}),
    )
    .await;
    let q = site.queue();
    q.send(vec![OutgoingMessage {
        message_id: "garbage-1".into(),
        body: "not json".into(),
        content_type: None,
        properties: BTreeMap::new(),
        scheduled_enqueue_at: None,
    }])
    .await
    .unwrap();
    wait_until_finished(&site, &ids, Duration::from_secs(30)).await;
    assert_eq!(status_of(&site, &ids[0]).await, "dead_letter");
    let deadline = Instant::now() + Duration::from_secs(20);
    let ls = loop {
        let ls = site.ops(&["dlq", "ls"]);
        if ls.contains("garbage-1") || Instant::now() > deadline {
            break ls;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(
        ls.contains(&ids[0]) && ls.contains("PermanentFailure"),
        "{ls}"
    );
    assert!(
        ls.contains("garbage-1") && ls.contains("MalformedMessage"),
        "{ls}"
    );
    let show = site.ops(&["dlq", "show", &ids[0]]);
    assert!(show.contains("\"dead_letter\""), "{show}");

    // The cause is fixed (the mock's 2nd call succeeds): replay from the DLQ.
    let dry = site.ops(&["dlq", "replay", "--dry-run"]);
    assert!(dry.contains(&format!("{}: would replay", ids[0])), "{dry}");
    let out = site.ops(&["dlq", "replay", "--reason", "downstream fixed"]);
    assert!(out.contains("1 replayed"), "{out}");
    wait_until_finished(&site, &ids, Duration::from_secs(30)).await;
    audit(&site, &ids).await;
    let ls = site.ops(&["dlq", "ls"]);
    assert!(!ls.contains(&ids[0]) && ls.contains("garbage-1"), "{ls}");

    // A message that names no transaction cannot be replayed: the CLI says
    // how to remove it.
    let out = site
        .command()
        .args(["dlq", "replay", "garbage-1", "--reason", "try"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("names no transaction to replay"),
        "{out:?}"
    );
    // Purging needs --yes, and is journaled.
    let refused = site.command().args(["dlq", "purge"]).output().unwrap();
    assert!(!refused.status.success());
    let out = site.ops(&["dlq", "purge", "--yes", "--reason", "garbage"]);
    assert!(out.contains("1 dead-lettered messages purged"), "{out}");
    assert!(
        site.ops(&["dlq", "ls"])
            .contains("0 dead-lettered messages")
    );
    let journal = read_journal(dir.path());
    assert!(
        journal.iter().any(|e| e["kind"] == "purge"
            && e["transaction_id"] == "garbage-1"
            && e["actor"].as_str().is_some_and(|a| a.starts_with("cli:"))),
        "{journal:?}"
    );
    assert!(
        journal
            .iter()
            .any(|e| e["kind"] == "replay" && e["transaction_id"] == ids[0].as_str()),
        "{journal:?}"
    );
}

/// Bulk replay by state and `--force` for a success.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bulk_replay_by_state_and_forced_replay() {
    let dir = tempfile::tempdir().unwrap();
    let (_mock, mock_port) = start_mock(&[]).await;
    let site = Site::new(dir.path(), mock_port);
    let _serve = site.start("serve").await;
    let bad = ingest(
        &site,
        "BULK",
        3,
        json!({"_mock": {"script": ["400", "ok"]}}),
    )
    .await;
    wait_until_finished(&site, &bad, Duration::from_secs(30)).await;
    let listed = site.ops(&["replay", "--state", "dead_letter", "--dry-run"]);
    assert!(listed.contains("3 selected"), "{listed}");
    let out = site.ops(&["replay", "--state", "dead_letter", "--rate", "20"]);
    assert!(out.contains("3 replayed"), "{out}");
    wait_until_finished(&site, &bad, Duration::from_secs(30)).await;
    audit(&site, &bad).await;

    // A success is replayed only with --force, and the journal says who and why.
    let refused = site.command().args(["replay", &bad[0]]).output().unwrap();
    assert!(!refused.status.success());
    site.ops(&[
        "replay",
        &bad[0],
        "--force",
        "--if-state",
        "success",
        "--operator",
        "alice",
        "--reason",
        "vendor asked",
    ]);
    let journal = read_journal(dir.path());
    assert!(journal.iter().any(|e| e["kind"] == "replay"
        && e["actor"] == "cli:alice"
        && e["reason"].as_str().unwrap_or("").contains("vendor asked")
        && e["reason"].as_str().unwrap_or("").contains("forced")));
}

/// A backlog whose messages are safe in the queue is not copied by recovery
/// passes: a ledger that blips three times (each return seen by the
/// watcher, probing every 0.1 s) leaves exactly one message per queued
/// transaction — a ledger return does not re-drive `pending`, and passes are
/// rate-limited.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_flapping_ledger_does_not_copy_the_queued_backlog() {
    use crate::support::process::OwnRedis;
    use crate::support::{AppOptions, spawn_app_with};
    use rtp_durability::envelope::props;
    use rtp_durability::recovery;
    use std::{collections::BTreeMap, time::Duration};
    let mut redis = OwnRedis::start_persistent();
    let app = spawn_app_with(AppOptions {
        redis_url: Some(redis.url()),
        configure: |s| s.recovery_probe_secs = 0.1,
        ..Default::default()
    })
    .await;
    const N: usize = 20;
    for i in 0..N {
        let r = app
            .post_json(&json!({ "transaction_id": format!("FLAP-{i:03}"), "amount": "1.00" }))
            .await;
        assert_eq!(r.status(), 202);
    }
    // The backlog waits in the queue (no processor runs), older than any
    // pending threshold the recovery pass can use (lock 2 s + timeout 1 s).
    tokio::time::sleep(Duration::from_secs(4)).await;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let watcher = tokio::spawn(recovery::watch_dependencies(
        app.services.recovery_watch(true),
        stop_rx,
    ));
    tokio::time::sleep(Duration::from_millis(500)).await;
    for _ in 0..3 {
        redis.kill();
        tokio::time::sleep(Duration::from_millis(1500)).await;
        redis.launch();
        tokio::time::sleep(Duration::from_millis(2000)).await;
    }
    let _ = stop_tx.send(true);
    let _ = watcher.await;

    let mut per_id: BTreeMap<String, usize> = BTreeMap::new();
    loop {
        let got = app
            .services
            .queue
            .receive(100, Duration::from_millis(500))
            .await
            .unwrap();
        if got.is_empty() {
            break;
        }
        for m in got {
            let id = m
                .properties
                .get(props::TRANSACTION_ID)
                .cloned()
                .unwrap_or_default();
            *per_id.entry(id).or_default() += 1;
            app.services.queue.complete(&m).await.unwrap();
        }
    }
    let total: usize = per_id.values().sum();
    assert_eq!(per_id.len(), N, "every queued transaction has its message");
    assert_eq!(
        total, N,
        "a backlog still in the queue must not be copied by recovery passes: {per_id:?}"
    );
}
