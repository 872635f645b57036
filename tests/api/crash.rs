//! kill -9 `rtpd dev` while `rtpd produce` runs, restart it, and show that
//! every transaction that got a 2xx reaches a terminal state, exactly once at
//! the downstream. Real processes, real sockets.

use crate::support::process::{
    DevPipeline, poll_json, rtpd, spawn_dev, start_dev_pipeline, wait_http_ok,
};
use rtp_durability::cli::produce::{Opts as ProduceOpts, produce};
use serde_json::Value;
use std::{process::Command, time::Duration};

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
        ..Default::default()
    };
    let load = tokio::spawn(async move { produce(&opts).await.unwrap() });
    // Let the load run, then kill -9 in the middle of it.
    poll_json(&format!("{base}/metrics"), Duration::from_secs(30), |m| {
        m["total"].as_u64().unwrap_or(0) >= 500
    })
    .await;
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
    let last = poll_json(&format!("{base}/metrics"), Duration::from_secs(90), |m| {
        let open = ["pending", "processing", "failed"]
            .iter()
            .map(|k| m[k].as_u64().unwrap_or(1))
            .sum::<u64>();
        open == 0 && m["total"].as_u64().unwrap_or(0) >= summary.acked
    })
    .await;
    assert_eq!(last["dead_letter"], 0, "{last}");

    let client = reqwest::Client::new();
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
        // The downstream Idempotency-Key is the vendor-scoped key.
        assert_eq!(
            calls["by_key"][format!("dev-vendor/{id}")]["successes"],
            1,
            "{id}"
        );
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
    poll_json(&format!("{base}/metrics"), Duration::from_secs(10), |m| {
        m["processing"] == 1
    })
    .await;
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
