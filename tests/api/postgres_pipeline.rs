//! The pipeline with the ledger on PostgreSQL (`RTPD_LEDGER=postgres`), the
//! API and the processor as separate `rtpd` processes (queue: the in-repo
//! Service Bus broker over AMQP; WAL: a directory both share), under load:
//! both processes are killed with SIGKILL and restarted, then PostgreSQL
//! itself crashes and restarts. While the database is down ingest answers
//! 503 + Retry-After and never a 2xx; afterwards every acknowledged
//! transaction ends `success`, called exactly once downstream.

use crate::support::postgres::OwnPostgres;
use crate::support::process::{Proc, free_port, poll_json, rtpd, start_mock, wait_http_ok};
use rtp_durability::auth::hash_secret;
use rtp_durability::cli::produce::{Opts as ProduceOpts, Summary, produce};
use serde_json::{Value, json};
use std::{
    path::{Path, PathBuf},
    process::Stdio,
    time::{Duration, Instant},
};

const KEY: &str = "pg-pipeline-vendor-key";

struct Pipeline {
    dir: PathBuf,
    env: Vec<(&'static str, String)>,
    api_port: u16,
    processor_port: u16,
    runs: u32,
}

impl Pipeline {
    fn base(&self) -> String {
        format!("http://127.0.0.1:{}", self.api_port)
    }

    /// `rtpd api` or `rtpd processor`, logging to a file in the data dir.
    fn spawn(&mut self, part: &str) -> Proc {
        self.runs += 1;
        let port = if part == "api" {
            self.api_port
        } else {
            self.processor_port
        };
        let log =
            std::fs::File::create(self.dir.join(format!("{part}-{}.log", self.runs))).unwrap();
        Proc(
            rtpd()
                .arg(part)
                .envs(self.env.iter().map(|(k, v)| (*k, v.as_str())))
                .env("RTPD_HTTP_ADDR", format!("127.0.0.1:{port}"))
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .unwrap(),
        )
    }

    async fn start(&mut self) -> (Proc, Proc) {
        let (api, processor) = (self.spawn("api"), self.spawn("processor"));
        for port in [self.api_port, self.processor_port] {
            wait_http_ok(
                &format!("http://127.0.0.1:{port}/healthz"),
                Duration::from_secs(30),
            )
            .await;
        }
        (api, processor)
    }
}

fn load(base: &str, prefix: &str, count: u64, rate: u64, acked: &Path) -> ProduceOpts {
    ProduceOpts {
        url: base.to_owned(),
        count,
        rate,
        concurrency: 16,
        payload_bytes: 200,
        api_key: Some(KEY.into()),
        prefix: Some(prefix.into()),
        acked_out: Some(acked.to_owned()),
        quiet: true,
        ..Default::default()
    }
}

fn acked_ids(path: &Path, summary: &Summary) -> Vec<String> {
    let ids: Vec<String> = std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect();
    assert_eq!(ids.len() as u64, summary.acked);
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_ledger_pipeline_survives_kill_9_and_a_database_restart() {
    let pg = OwnPostgres::start();
    let broker = sb_test_broker::start(sb_test_broker::BrokerConfig {
        queues: vec!["rtp-transactions".into()],
        lock_duration: Duration::from_secs(2),
        duplicate_window: Duration::from_secs(60),
        sas_key: Some("pg-pipeline".into()),
        ..Default::default()
    })
    .await
    .unwrap();
    let (_mock, mock_port) = start_mock(&[]).await;
    let dir = tempfile::tempdir().unwrap();
    let mut p = Pipeline {
        dir: dir.path().to_owned(),
        env: vec![
            ("RTPD_DATA_DIR", dir.path().display().to_string()),
            ("RTPD_LEDGER", "postgres".into()),
            ("RTPD_POSTGRES_URL", pg.url.clone()),
            // The test reads /metrics without a token.
            ("RTPD_PUBLIC_METRICS", "true".into()),
            ("RTPD_QUEUE", "servicebus".into()),
            (
                "RTPD_SERVICEBUS_CONNECTION_STRING",
                broker.connection_string(),
            ),
            ("RTPD_SERVICEBUS_QUEUE", "rtp-transactions".into()),
            (
                "RTPD_DOWNSTREAM_URL",
                format!("http://127.0.0.1:{mock_port}/process"),
            ),
            (
                "RTPD_VENDOR_KEYS",
                format!("acme:sha256:{}", hash_secret(KEY)),
            ),
            ("RTPD_VENDOR_RATE_PER_SEC", "0".into()),
            ("RTPD_LOCK_DURATION_SECS", "2".into()),
            ("RTPD_DOWNSTREAM_TIMEOUT_SECS", "1".into()),
            ("RTPD_BACKOFF_BASE_SECS", "0.1".into()),
            ("RTPD_BACKOFF_MAX_SECS", "0.5".into()),
            ("RTPD_RECONCILE_INTERVAL_SECS", "0.5".into()),
            ("RTPD_RECONCILE_PENDING_AFTER_SECS", "4".into()),
            ("RTPD_LOG_LEVEL", "warn".into()),
        ],
        api_port: free_port(),
        processor_port: free_port(),
        runs: 0,
    };
    let base = p.base();
    let (mut api, mut processor) = p.start().await;

    // 1. Load, and kill -9 both processes in the middle of it.
    let acked1 = dir.path().join("acked-1.txt");
    let opts = load(&base, "PGK", 20_000, 0, &acked1);
    let run = tokio::spawn(async move { produce(&opts).await.unwrap() });
    poll_json(&format!("{base}/metrics"), Duration::from_secs(60), |m| {
        m["success"].as_u64().unwrap_or(0) >= 300
    })
    .await;
    processor.kill9();
    api.kill9();
    let summary1 = run.await.unwrap();
    assert!(
        summary1.acked > 0 && summary1.acked < 20_000,
        "{summary1:?}"
    );
    let mut acked = acked_ids(&acked1, &summary1);

    // 2. Restarted, under load again; PostgreSQL crashes and comes back.
    let (_api, _processor) = p.start().await;
    let acked2 = dir.path().join("acked-2.txt");
    let opts = load(&base, "PGR", 4_000, 400, &acked2);
    let run = tokio::spawn(async move { produce(&opts).await.unwrap() });
    poll_json(&format!("{base}/metrics"), Duration::from_secs(60), |m| {
        m["total"].as_u64().unwrap_or(0) >= summary1.acked + 500
    })
    .await;
    pg.down();
    let client = reqwest::Client::new();
    let mut refused = 0;
    for i in 0..5 {
        let started = Instant::now();
        let r = client
            .post(format!("{base}/v1/transactions"))
            .header("X-Api-Key", KEY)
            .json(&json!({ "transaction_id": format!("PG-DOWN-{i}"), "amount": "1.00" }))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 503, "never a 2xx while the ledger is down");
        assert!(r.headers().get("retry-after").is_some());
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["error"], "unavailable", "{body}");
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "a dead database answers fast: {:?}",
            started.elapsed()
        );
        refused += 1;
    }
    let ready = client.get(format!("{base}/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 503);
    tokio::time::sleep(Duration::from_secs(1)).await;
    pg.up();
    let summary2 = run.await.unwrap();
    assert!(
        summary2.by_code.get("503").copied().unwrap_or(0) > 0,
        "the load met the outage: {summary2:?}"
    );
    assert!(summary2.acked > 0, "{summary2:?}");
    acked.extend(acked_ids(&acked2, &summary2));

    // 3. Everything acknowledged finishes, once.
    let total = acked.len() as u64;
    let last = poll_json(&format!("{base}/metrics"), Duration::from_secs(120), |m| {
        let open = ["pending", "processing", "failed"]
            .iter()
            .map(|k| m[k].as_u64().unwrap_or(1))
            .sum::<u64>();
        open == 0 && m["success"].as_u64().unwrap_or(0) >= total
    })
    .await;
    assert_eq!(last["dead_letter"], 0, "{last}");
    let calls = poll_json(
        &format!("http://127.0.0.1:{mock_port}/calls"),
        Duration::from_secs(5),
        |_| true,
    )
    .await;
    assert_eq!(
        calls["duplicate_successes"], 0,
        "at most one success per id"
    );
    assert_eq!(calls["concurrent_overlaps"], 0);
    for id in &acked {
        let rec: Value = client
            .get(format!("{base}/v1/transactions/{id}"))
            .header("X-Api-Key", KEY)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(rec["status"], "success", "{id}: {rec}");
        // The downstream Idempotency-Key is the vendor-scoped key.
        assert_eq!(
            calls["by_key"][format!("acme/{id}")]["successes"],
            1,
            "{id}"
        );
    }
    println!(
        "acknowledged {total} ({} before the kill, {} around the database restart, \
         {refused} probes refused while it was down); all succeeded once",
        summary1.acked, summary2.acked
    );
}
