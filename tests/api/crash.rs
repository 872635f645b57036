//! kill -9 `rtpd dev` while `rtpd produce` runs, restart it, and show that
//! every transaction that got a 2xx reaches a terminal state, exactly once at
//! the downstream. Real processes, real sockets.

use rtp_durability::cli::produce::{Opts as ProduceOpts, produce};
use serde_json::Value;
use std::{
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

/// Kills the child when dropped, so a failing test leaves nothing running.
pub struct Proc(pub Child);

impl Proc {
    /// SIGKILL, and reap.
    pub fn kill9(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

pub use crate::support::free_port;

pub async fn wait_http_ok(url: &str, within: Duration) {
    let client = reqwest::Client::new();
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if let Ok(r) = client.get(url).send().await
            && r.status().is_success()
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{url} did not answer within {within:?}");
}

pub fn rtpd() -> Command {
    Command::new(env!("CARGO_BIN_EXE_rtpd"))
}

/// `rtpd mock-downstream` that always succeeds, plus any extra flags.
pub fn spawn_mock(port: u16, extra: &[&str]) -> Proc {
    Proc(
        rtpd()
            .args([
                "mock-downstream",
                "--addr",
                &format!("127.0.0.1:{port}"),
                "--success-rate",
                "1",
            ])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    )
}

/// A mock downstream and `rtpd dev` in front of it, both answering.
pub struct DevPipeline {
    pub mock: Proc,
    pub dev: Proc,
    pub api_port: u16,
    pub mock_port: u16,
    pub base: String,
    pub api_key: String,
}

pub async fn start_dev_pipeline(dir: &Path, mock_extra: &[&str]) -> DevPipeline {
    let (api_port, mock_port) = (free_port(), free_port());
    let mock = spawn_mock(mock_port, mock_extra);
    wait_http_ok(
        &format!("http://127.0.0.1:{mock_port}/healthz"),
        Duration::from_secs(20),
    )
    .await;
    let dev = spawn_dev(dir, api_port, mock_port);
    let base = format!("http://127.0.0.1:{api_port}");
    wait_http_ok(&format!("{base}/healthz"), Duration::from_secs(20)).await;
    let creds: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("dev-credentials.json")).unwrap())
            .unwrap();
    DevPipeline {
        mock,
        dev,
        api_port,
        mock_port,
        base,
        api_key: creds["api_key"].as_str().unwrap().to_owned(),
    }
}

pub fn spawn_dev(dir: &Path, api_port: u16, mock_port: u16) -> Proc {
    Proc(
        rtpd()
            .arg("dev")
            .arg("--no-mock")
            .env("RTPD_DATA_DIR", dir)
            .env("RTPD_HTTP_ADDR", format!("127.0.0.1:{api_port}"))
            .env(
                "RTPD_DOWNSTREAM_URL",
                format!("http://127.0.0.1:{mock_port}/process"),
            )
            .env("RTPD_LOCK_DURATION_SECS", "2")
            .env("RTPD_DOWNSTREAM_TIMEOUT_SECS", "1")
            .env("RTPD_BACKOFF_BASE_SECS", "0.1")
            .env("RTPD_BACKOFF_MAX_SECS", "0.5")
            .env("RTPD_RECONCILE_INTERVAL_SECS", "0.5")
            .env("RTPD_RECONCILE_PENDING_AFTER_SECS", "2")
            .env("RTPD_LOG_LEVEL", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_during_load_loses_nothing_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let DevPipeline {
        mock: _mock,
        mut dev,
        api_port,
        mock_port,
        base,
        api_key: key,
    } = start_dev_pipeline(dir.path(), &[]).await;

    let acked_file = dir.path().join("acked.txt");
    let opts = ProduceOpts {
        url: base.clone(),
        count: 20_000,
        rate: 0,
        concurrency: 32,
        payload_bytes: 200,
        api_key: Some(key.clone()),
        prefix: Some("CRASH".into()),
        acked_out: Some(acked_file.clone()),
        quiet: true,
    };
    let load = tokio::spawn(async move { produce(&opts).await.unwrap() });
    // Let the load run, then kill -9 in the middle of it.
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let m: Value = client
            .get(format!("{base}/metrics"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if m["total"].as_u64().unwrap_or(0) >= 500 || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    dev.0.kill().unwrap(); // SIGKILL
    dev.0.wait().unwrap();
    let summary = load.await.unwrap();
    assert!(
        summary.acked > 0,
        "some transactions were acknowledged before the kill"
    );
    assert!(summary.acked < 20_000, "the kill happened during the load");
    let acked: Vec<String> = std::fs::read_to_string(&acked_file)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect();
    assert_eq!(acked.len() as u64, summary.acked);

    let _dev = spawn_dev(dir.path(), api_port, mock_port);
    wait_http_ok(&format!("{base}/healthz"), Duration::from_secs(20)).await;
    // Wait for the restarted pipeline to finish everything.
    let deadline = Instant::now() + Duration::from_secs(90);
    let last = loop {
        let last: Value = client
            .get(format!("{base}/metrics"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let open = ["pending", "processing", "failed"]
            .iter()
            .map(|k| last[k].as_u64().unwrap())
            .sum::<u64>();
        if open == 0 && last["total"].as_u64().unwrap() >= summary.acked {
            break last;
        }
        assert!(
            Instant::now() < deadline,
            "pipeline did not drain after restart: {last}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(last["dead_letter"], 0, "{last}");

    // Audit: every acknowledged id succeeded, and the downstream saw it succeed once.
    let calls: Value = client
        .get(format!("http://127.0.0.1:{mock_port}/calls"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(calls["duplicate_successes"], 0);
    assert_eq!(calls["concurrent_overlaps"], 0);
    for id in &acked {
        let rec: Value = client
            .get(format!("{base}/v1/transactions/{id}"))
            .header("X-Api-Key", &key)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(rec["status"], "success", "{id}: {rec}");
        assert_eq!(calls["by_key"][id]["successes"], 1, "{id}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_in_flight_work_and_exits_0() {
    let dir = tempfile::tempdir().unwrap();
    let DevPipeline {
        mock: _mock,
        mut dev,
        api_port,
        mock_port,
        base,
        api_key,
    } = start_dev_pipeline(dir.path(), &["--latency-ms", "600"]).await;
    let key = api_key.as_str();
    let client = reqwest::Client::new();
    let r = client
        .post(format!("{base}/v1/transactions"))
        .header("X-Api-Key", key)
        .json(&serde_json::json!({"transaction_id": "TERM-1"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    // Wait until the downstream call is in flight, then ask the process to stop.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let m: Value = client
            .get(format!("{base}/metrics"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if m["processing"] == 1 {
            break;
        }
        assert!(Instant::now() < deadline, "never started processing: {m}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let term = Command::new("kill")
        .arg("-TERM")
        .arg(dev.0.id().to_string())
        .status()
        .unwrap();
    assert!(term.success());
    let status = tokio::task::spawn_blocking(move || {
        let s = dev.0.wait().unwrap();
        std::mem::forget(dev);
        s
    })
    .await
    .unwrap();
    assert!(status.success(), "exit status {status:?}");
    // The in-flight call was finished and recorded before exiting.
    let out = rtpd()
        .args(["wal", "cat", "TERM-1"])
        .env("RTPD_DATA_DIR", dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _dev = spawn_dev(dir.path(), api_port, mock_port);
    wait_http_ok(&format!("{base}/healthz"), Duration::from_secs(20)).await;
    let rec: Value = client
        .get(format!("{base}/v1/transactions/TERM-1"))
        .header("X-Api-Key", key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(rec["status"], "success", "{rec}");
    assert_eq!(
        rec["attempts"], 1,
        "finished before exit, not redone after restart"
    );
}
