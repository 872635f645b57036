//! Observability: one payment is one trace from the vendor's POST to the
//! payment call, exported over OTLP to a real receiver; the metrics go out
//! over OTLP too; the gauges operators page on move with the pipeline.

use crate::support::otlp::{OtlpReceiver, Span};
use crate::support::process::{
    Proc, dev_command, free_port, rtpd, spawn_dev_with, start_mock, wait_http_ok,
};
use crate::support::{self, AppOptions, json, spawn_app_with};
use serde_json::{Value, json};
use std::time::Duration;

const VENDOR_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const VENDOR_SPAN: &str = "00f067aa0ba902b7";

fn one<'a>(spans: &'a [Span], name: &str, trace: &str) -> Vec<&'a Span> {
    spans
        .iter()
        .filter(|s| s.name == name && s.trace_id == trace)
        .collect()
}

#[tokio::test]
async fn one_post_is_one_trace_from_the_vendor_to_the_payment_call() {
    let receiver = OtlpReceiver::start();
    let dir = tempfile::tempdir().unwrap();
    let (_mock, mock_port) = start_mock(&[]).await;
    let api_port = free_port();
    let _dev = spawn_dev_with(
        rtpd(),
        dir.path(),
        api_port,
        mock_port,
        &["--otlp", &receiver.url],
        &[
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
            ("OTEL_METRIC_EXPORT_INTERVAL", "300"),
            ("OTEL_SERVICE_NAME", "rtpd-under-test"),
            ("RTPD_RECONCILE_INTERVAL_SECS", "1"),
        ],
    );
    let base = format!("http://127.0.0.1:{api_port}");
    wait_http_ok(&format!("{base}/healthz"), Duration::from_secs(20)).await;
    let creds: Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("dev-credentials.json")).unwrap(),
    )
    .unwrap();
    let client = reqwest::Client::new();

    // The vendor traces its own call, and does not sample it (`-00`): the
    // payment is traced all the same, in a trace of rtpd's own, linked to
    // the vendor's span.
    let r = client
        .post(format!("{base}/v1/transactions"))
        .header("X-Api-Key", creds["api_key"].as_str().unwrap())
        .header("traceparent", format!("00-{VENDOR_TRACE}-{VENDOR_SPAN}-00"))
        .json(&json!({"transaction_id": "TRACE-1", "amount": "1.00"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);

    let names = [
        "POST /v1/transactions",
        "wal.append",
        "wal.flush",
        "ledger.register",
        "queue.send",
        "process",
        "ledger.claim",
        "downstream.call",
        "ledger.settle",
    ];
    receiver
        .wait_for(Duration::from_secs(30), "the ingest span", |r| {
            r.spans().iter().any(|s| s.name == "POST /v1/transactions")
        })
        .await;
    let trace = receiver
        .spans()
        .into_iter()
        .find(|s| s.name == "POST /v1/transactions")
        .unwrap()
        .trace_id;
    assert_ne!(
        trace, VENDOR_TRACE,
        "the vendor does not choose the trace id"
    );
    receiver
        .wait_for(Duration::from_secs(30), "every span of the payment", |r| {
            let spans = r.spans();
            names.iter().all(|n| !one(&spans, n, &trace).is_empty())
        })
        .await;
    let spans = receiver.spans();
    let span = |name: &str| one(&spans, name, &trace)[0].clone();
    let (ingest, process, call) = (
        span("POST /v1/transactions"),
        span("process"),
        span("downstream.call"),
    );
    assert_eq!(ingest.parent_span_id, "", "a root span of rtpd's trace");
    assert_eq!(
        ingest.links,
        [format!("{VENDOR_TRACE}/{VENDOR_SPAN}")],
        "linked to the vendor's span"
    );
    assert_eq!(ingest.attributes["vendor.trace_id"], VENDOR_TRACE);
    assert_eq!(ingest.kind, 2, "server");
    // Every span that names the payment names it the same two ways: the
    // vendor's id and the vendor-scoped key, so one query joins them.
    let named: Vec<_> = spans
        .iter()
        .filter(|s| s.trace_id == trace && s.attributes.contains_key("transaction_id"))
        .collect();
    for name in [
        "POST /v1/transactions",
        "wal.append",
        "ledger.register",
        "queue.send",
        "process",
        "ledger.claim",
        "downstream.call",
        "ledger.settle",
    ] {
        assert!(
            named.iter().any(|s| s.name == name),
            "{name} has transaction_id"
        );
    }
    for s in &named {
        assert_eq!(s.attributes["transaction_id"], "TRACE-1", "{}", s.name);
        assert_eq!(
            s.attributes.get("transaction_key").map(String::as_str),
            Some("dev-vendor/TRACE-1"),
            "{}",
            s.name
        );
    }
    assert_eq!(ingest.attributes["http.response.status_code"], "202");
    assert_eq!(ingest.service_name, "rtpd-under-test");
    assert_eq!(span("wal.append").parent_span_id, ingest.span_id);
    assert_eq!(span("wal.flush").parent_span_id, span("wal.append").span_id);
    // A flush covers a batch: it counts its records, and its appends' spans
    // (its parent and its links) name them.
    assert_eq!(span("wal.flush").attributes["records"], "1");
    assert_eq!(span("queue.send").parent_span_id, ingest.span_id);
    assert_eq!(span("queue.send").kind, 4, "producer");
    assert_eq!(
        process.parent_span_id, ingest.span_id,
        "the processor continues the message's context"
    );
    assert_eq!(process.kind, 5, "consumer");
    assert_eq!(process.attributes["outcome"], "success");
    assert_eq!(call.parent_span_id, process.span_id);
    assert_eq!(call.attributes["result"], "success");
    assert_eq!(call.attributes["http.response.status_code"], "200");

    // The payment service saw the same trace, as the downstream call's child.
    let calls = crate::support::process::mock_calls(mock_port).await;
    // The Idempotency-Key is the vendor-scoped key (`rtpd dev`'s vendor).
    let tps = calls["by_key"]["dev-vendor/TRACE-1"]["traceparents"]
        .as_array()
        .unwrap()
        .clone();
    assert_eq!(tps, [json!(format!("00-{trace}-{}-01", call.span_id))]);

    // An operator replay links back to the original trace through the WAL record.
    let r = client
        .post(format!("{base}/v1/transactions/TRACE-1/replay"))
        .bearer_auth(creds["admin_token"].as_str().unwrap())
        .json(&json!({"force": true, "reason": "telemetry test", "expected_state": "success"}))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.status());
    receiver
        .wait_for(Duration::from_secs(30), "the replay span", |r| {
            r.spans().iter().any(|s| s.name == "replay")
        })
        .await;
    let spans = receiver.spans();
    let replay = spans.iter().find(|s| s.name == "replay").unwrap();
    assert_ne!(replay.trace_id, trace, "a replay is its own operation");
    assert_eq!(replay.links, [format!("{trace}/{}", ingest.span_id)]);

    // The metrics went out over OTLP under the /metrics names.
    receiver
        .wait_for(Duration::from_secs(30), "the metrics", |r| {
            let points = r.points();
            let has = |metric: &str, key: &str, value: &str| {
                points.iter().any(|p| {
                    p.metric == metric
                        && p.attributes.get(key).map(String::as_str) == Some(value)
                        && p.value >= 1.0
                })
            };
            has("rtpd_ingest_requests", "code", "202")
                && has("rtpd_downstream_calls", "result", "success")
                && has("rtpd_ledger_transactions", "state", "success")
                && points
                    .iter()
                    .any(|p| p.metric == "rtpd_oldest_pending_age_seconds")
                && points.iter().any(|p| p.metric == "rtpd_recovery_waiting")
                && points
                    .iter()
                    .any(|p| p.metric == "rtpd_recovery_oldest_wait_seconds")
                && r.histograms()
                    .iter()
                    .any(|h| h == "rtpd_downstream_duration_seconds")
                && r.histograms()
                    .iter()
                    .any(|h| h == "rtpd_wal_flush_duration_seconds")
        })
        .await;

    // The reconciler's passes (every second here) read the ledger for each
    // recent WAL record, this payment's too; no span of a pass names it as
    // `transaction_id`, so the query that finds a payment by its id
    // (docs/observability.md) does not return whole passes.
    receiver
        .wait_for(
            Duration::from_secs(30),
            "a reconcile pass that checked TRACE-1",
            |r| {
                let spans = r.spans();
                spans.iter().filter(|p| p.name == "reconcile").any(|p| {
                    spans.iter().any(|s| {
                        s.trace_id == p.trace_id
                            && s.name.starts_with("ledger.")
                            && s.attributes.get("checked_key").map(String::as_str)
                                == Some("dev-vendor/TRACE-1")
                    })
                })
            },
        )
        .await;
    let spans = receiver.spans();
    for pass in spans.iter().filter(|s| s.name == "reconcile") {
        for s in spans.iter().filter(|s| s.trace_id == pass.trace_id) {
            assert!(
                !s.attributes.contains_key("transaction_id"),
                "{} in a reconcile pass names a payment: {:?}",
                s.name,
                s.attributes
            );
        }
    }

    // Each process is its own instance (replicas must not collide), the
    // same one on traces and metrics.
    let instance = ingest.resource.get("service.instance.id").cloned();
    let instance = instance.expect("spans carry service.instance.id");
    assert!(
        instance.len() > 32,
        "host name and a process uuid: {instance}"
    );
    assert!(
        spans
            .iter()
            .all(|s| s.resource.get("service.instance.id") == Some(&instance))
    );
    for resource in receiver.metric_resources() {
        assert_eq!(
            resource.get("service.instance.id"),
            Some(&instance),
            "metrics carry the same service.instance.id"
        );
    }
    receiver.stop().await;
}

fn gauge(text: &str, line_start: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(line_start))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {line_start} in:\n{text}"))
}

#[tokio::test]
async fn a_backlog_ages_the_oldest_pending_and_a_poison_message_counts_as_dead_lettered() {
    let app = spawn_app_with(AppOptions::default()).await;
    let age = "rtpd_oldest_pending_age_seconds ";
    let dead = "rtpd_ledger_transactions{state=\"dead_letter\"} ";
    let r = app
        .post_json(&json!({"transaction_id": "G-ok", "amount": "1"}))
        .await;
    assert_eq!(r.status(), 202);
    let r = app
        .post_json(&json!({"transaction_id": "G-poison", "_mock": {"script": ["400"]}}))
        .await;
    assert_eq!(r.status(), 202);

    // Nothing processed yet: the backlog's oldest entry ages.
    let first = gauge(&app.prometheus().await, age);
    tokio::time::sleep(Duration::from_millis(50)).await;
    let second = gauge(&app.prometheus().await, age);
    assert!(
        second > first,
        "oldest pending age grows: {first} then {second}"
    );
    assert!(second >= 0.05, "{second}");
    assert_eq!(gauge(&app.prometheus().await, dead), 0.0);

    app.drain_until_terminal(&["G-ok", "G-poison"]).await;
    let text = app.prometheus().await;
    assert_eq!(gauge(&text, age), 0.0, "no pending transaction left");
    assert_eq!(gauge(&text, dead), 1.0);
    assert_eq!(
        gauge(
            &text,
            "rtpd_dead_lettered_total{cause=\"PermanentFailure\"} "
        ),
        1.0
    );
    assert_eq!(
        gauge(&text, "rtpd_ledger_transactions{state=\"success\"} "),
        1.0
    );
    assert!(
        gauge(
            &text,
            "rtpd_downstream_duration_seconds_count{result=\"permanent\"} "
        ) >= 1.0,
        "{text}"
    );
    let body = json(app.admin_get("/metrics").await).await;
    assert_eq!(body["dead_letter"], 1);
}

/// Microsoft's Python SDK, reading the message `rtpd api` put on (a test
/// broker that behaves like) Service Bus, finds the ingest span's context in
/// `Diagnostic-Id` and `traceparent`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_service_bus_message_carries_the_trace_to_microsofts_sdk() {
    let python = std::env::var("SB_INTEROP_PYTHON")
        .expect("SB_INTEROP_PYTHON is not set: run the tests with scripts/test.sh, which installs the Python SDK");
    let receiver = OtlpReceiver::start();
    let queue = format!("q-{}", uuid::Uuid::new_v4().simple());
    let broker = sb_test_broker::start(sb_test_broker::BrokerConfig {
        queues: vec![queue.clone()],
        lock_duration: Duration::from_secs(5),
        duplicate_window: Duration::from_secs(60),
        sas_key: Some("otel-test".into()),
        ..Default::default()
    })
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let key = "otel-test-key";
    let _api = crate::support::process::Proc(
        crate::support::process::rtpd()
            .arg("api")
            .env("RTPD_DATA_DIR", dir.path())
            .env("RTPD_HTTP_ADDR", format!("127.0.0.1:{port}"))
            .env("RTPD_QUEUE", "servicebus")
            .env(
                "RTPD_SERVICEBUS_CONNECTION_STRING",
                broker.connection_string(),
            )
            .env("RTPD_SERVICEBUS_QUEUE", &queue)
            .env(
                "RTPD_VENDOR_KEYS",
                format!("acme:sha256:{}", rtp_durability::auth::hash_secret(key)),
            )
            .env("RTPD_LOG_LEVEL", "warn")
            .env("OTEL_EXPORTER_OTLP_ENDPOINT", &receiver.url)
            .env("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
            .env("OTEL_BSP_SCHEDULE_DELAY", "100")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let base = format!("http://127.0.0.1:{port}");
    wait_http_ok(&format!("{base}/healthz"), Duration::from_secs(20)).await;
    let body = r#"{"transaction_id":"SB-TRACE-1","amount":"3.00"}"#;
    let r = reqwest::Client::new()
        .post(format!("{base}/v1/transactions"))
        .header("X-Api-Key", key)
        .header("Content-Type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    receiver
        .wait_for(Duration::from_secs(30), "the ingest span", |r| {
            r.spans().iter().any(|s| s.name == "POST /v1/transactions")
        })
        .await;
    let ingest = receiver
        .spans()
        .into_iter()
        .find(|s| s.name == "POST /v1/transactions")
        .unwrap();
    assert_eq!(
        ingest.parent_span_id, "",
        "no incoming traceparent: a new trace"
    );
    let expected = format!("00-{}-{}-01", ingest.trace_id, ingest.span_id);

    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/servicebus/interop.py");
    let out = tokio::process::Command::new(python)
        .arg(script)
        .args(["receive-check", "--connection-string"])
        .arg(broker.connection_string())
        .args([
            "--queue",
            &queue,
            "--message-id",
            &support::key("SB-TRACE-1"),
            "--body",
            body,
        ])
        .args(["--some-properties", "--property"])
        .arg(format!("Diagnostic-Id={expected}"))
        .arg("--property")
        .arg(format!("traceparent={expected}"))
        .arg("--property")
        .arg(format!("transaction_id={}", support::key("SB-TRACE-1")))
        .output()
        .await
        .expect("python runs");
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "python receive-check failed: {text}");
    receiver.stop().await;
}

/// Over OTLP/gRPC (what the Container Apps agent accepts), chosen with the
/// standard variables alone: the same one trace.
#[tokio::test]
async fn grpc_export_carries_the_same_trace() {
    let receiver = OtlpReceiver::start_grpc().await;
    let dir = tempfile::tempdir().unwrap();
    let (_mock, mock_port) = start_mock(&[]).await;
    let api_port = free_port();
    let _dev = spawn_dev_with(
        rtpd(),
        dir.path(),
        api_port,
        mock_port,
        &[],
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &receiver.url),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
            // Metrics elsewhere: this receiver has the trace service only.
            ("OTEL_EXPORTER_OTLP_METRICS_PROTOCOL", "http/protobuf"),
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
        ],
    );
    let base = format!("http://127.0.0.1:{api_port}");
    wait_http_ok(&format!("{base}/healthz"), Duration::from_secs(20)).await;
    let creds: Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("dev-credentials.json")).unwrap(),
    )
    .unwrap();
    let r = reqwest::Client::new()
        .post(format!("{base}/v1/transactions"))
        .header("X-Api-Key", creds["api_key"].as_str().unwrap())
        .header("traceparent", format!("00-{VENDOR_TRACE}-{VENDOR_SPAN}-01"))
        .json(&json!({"transaction_id": "GRPC-1"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    receiver
        .wait_for(
            Duration::from_secs(30),
            "the payment's spans over gRPC",
            |r| {
                let spans = r.spans();
                let Some(ingest) = spans.iter().find(|s| s.name == "POST /v1/transactions") else {
                    return false;
                };
                ["process", "downstream.call"]
                    .iter()
                    .all(|n| !one(&spans, n, &ingest.trace_id).is_empty())
            },
        )
        .await;
    let spans = receiver.spans();
    let ingest = spans
        .iter()
        .find(|s| s.name == "POST /v1/transactions")
        .unwrap();
    assert_eq!(ingest.links, [format!("{VENDOR_TRACE}/{VENDOR_SPAN}")]);
    assert_eq!(ingest.service_name, "rtpd");
    let process = one(&spans, "process", &ingest.trace_id)[0];
    assert_eq!(process.parent_span_id, ingest.span_id);
    receiver.stop().await;
}

/// A protocol this build cannot speak is a start-up error naming the variable,
/// not a silent fallback to another protocol.
#[test]
fn an_unsupported_otlp_protocol_is_refused_by_name() {
    let out = crate::support::process::rtpd()
        .args(["config"])
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9")
        .env("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "http/json")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with("rtpd: OTEL_EXPORTER_OTLP_TRACES_PROTOCOL:") && err.contains("http/json"),
        "{err}"
    );
}

async fn post(client: &reqwest::Client, base: &str, key: &str, id: &str) {
    let r = client
        .post(format!("{base}/v1/transactions"))
        .header("X-Api-Key", key)
        .json(&json!({"transaction_id": id, "amount": "1.00"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202, "{id}");
}

fn api_key(dir: &std::path::Path) -> String {
    let creds: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("dev-credentials.json")).unwrap())
            .unwrap();
    creds["api_key"].as_str().unwrap().to_owned()
}

/// Waits until `log` (a process's output) has a line containing `text`.
async fn wait_for_log(log: &std::path::Path, text: &str, within: Duration) {
    let deadline = std::time::Instant::now() + within;
    loop {
        let seen = std::fs::read_to_string(log).unwrap_or_default();
        if seen.contains(text) {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no {text:?} in the log within {within:?}:\n{seen}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Issue 15 finding 3: the log lines go out over OTLP too, each with the
/// trace and span it was written in — a payment's retry warning joins the
/// payment's trace — and lines outside any span (start-up) without one.
#[tokio::test]
async fn log_lines_go_out_over_otlp_with_their_trace() {
    let receiver = OtlpReceiver::start();
    let dir = tempfile::tempdir().unwrap();
    let (_mock, mock_port) = start_mock(&[]).await;
    let api_port = free_port();
    let _dev = spawn_dev_with(
        rtpd(),
        dir.path(),
        api_port,
        mock_port,
        &["--otlp", &receiver.url],
        &[
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
            ("OTEL_BLRP_SCHEDULE_DELAY", "100"),
        ],
    );
    let base = format!("http://127.0.0.1:{api_port}");
    wait_http_ok(&format!("{base}/healthz"), Duration::from_secs(20)).await;
    let key = api_key(dir.path());
    let r = reqwest::Client::new()
        .post(format!("{base}/v1/transactions"))
        .header("X-Api-Key", &key)
        .json(&json!({"transaction_id": "LOG-1", "amount": "1.00", "_mock": {"script": ["503", "ok"]}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    receiver
        .wait_for(
            Duration::from_secs(30),
            "the retry warning in the payment's trace",
            |r| {
                let spans = r.spans();
                let Some(ingest) = spans.iter().find(|s| {
                    s.name == "POST /v1/transactions"
                        && s.attributes.get("transaction_id").map(String::as_str) == Some("LOG-1")
                }) else {
                    return false;
                };
                r.logs().iter().any(|l| {
                    l.body == "transient failure; retry scheduled"
                        && l.severity_text == "WARN"
                        && l.trace_id == ingest.trace_id
                        && !l.span_id.is_empty()
                        && l.attributes.get("attempt").map(String::as_str) == Some("1")
                })
            },
        )
        .await;
    let logs = receiver.logs();
    assert!(
        logs.iter()
            .any(|l| l.trace_id.is_empty() && !l.body.is_empty()),
        "lines outside any span go out too: {logs:?}"
    );
    assert!(
        logs.iter()
            .all(|l| l.resource.contains_key("service.instance.id")),
        "{logs:?}"
    );
}

/// The collector is down while payments arrive, then comes back: the
/// payments after it returns are traced again, without waiting for luck.
#[tokio::test]
async fn tracing_resumes_once_the_collector_is_back() {
    let collector_port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("rtpd.log");
    let (_mock, mock_port) = start_mock(&[]).await;
    let api_port = free_port();
    let mut cmd = dev_command(
        rtpd(),
        dir.path(),
        api_port,
        mock_port,
        &["--otlp", &format!("http://127.0.0.1:{collector_port}")],
        &[
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
            ("OTEL_EXPORTER_OTLP_TIMEOUT", "500"),
        ],
    );
    let _dev = Proc(
        cmd.stdout(std::fs::File::create(&log).unwrap())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let base = format!("http://127.0.0.1:{api_port}");
    wait_http_ok(&format!("{base}/healthz"), Duration::from_secs(20)).await;
    let key = api_key(dir.path());
    let client = reqwest::Client::new();
    // Spread out, so that several batches (one every 100 ms) fail in a row:
    // one failed export alone does not stop recording.
    for i in 0..8 {
        post(&client, &base, &key, &format!("DOWN-{i}")).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    crate::support::process::poll_json(
        &format!("http://127.0.0.1:{mock_port}/calls"),
        Duration::from_secs(20),
        |calls| (0..8).all(|i| calls["by_key"][format!("dev-vendor/DOWN-{i}")].is_object()),
    )
    .await;
    wait_for_log(
        &log,
        "OTLP span exports keep failing",
        Duration::from_secs(20),
    )
    .await;
    // The spans already queued meet the dead collector too (one batch every
    // 100 ms, 0.5 s each), so none is left to reach the collector later
    // and mistake a stale export for recovery.
    tokio::time::sleep(Duration::from_secs(2)).await;
    // Issue 15 finding 2: with export paused, trace context still travels:
    // the payment's downstream call carries a traceparent.
    post(&client, &base, &key, "DARK-1").await;
    let calls = crate::support::process::poll_json(
        &format!("http://127.0.0.1:{mock_port}/calls"),
        Duration::from_secs(20),
        |calls| calls["by_key"]["dev-vendor/DARK-1"].is_object(),
    )
    .await;
    let sent = &calls["by_key"]["dev-vendor/DARK-1"]["traceparents"];
    let tp = sent[0]
        .as_str()
        .unwrap_or_else(|| panic!("no traceparent: {calls}"));
    let parts: Vec<&str> = tp.split('-').collect();
    assert_eq!(parts.len(), 4, "{tp}");
    assert!(parts[1].len() == 32 && parts[1] != "0".repeat(32), "{tp}");
    // Sampled as the operator's sampler says (every trace, by default),
    // only not exported: the downstream's own sampling is not changed by
    // our collector's outage.
    assert_eq!(parts[3], "01", "the sampled flag as usual: {tp}");

    let receiver = OtlpReceiver::start_on(collector_port);
    let deadline = std::time::Instant::now() + Duration::from_secs(12);
    let mut i = 0;
    loop {
        let traced = receiver.spans().iter().any(|s| {
            s.name == "POST /v1/transactions"
                && s.attributes
                    .get("transaction_id")
                    .is_some_and(|id| id.starts_with("UP-"))
        });
        if traced {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no payment traced within 12 s of the collector's return ({i} posted)"
        );
        post(&client, &base, &key, &format!("UP-{i}")).await;
        i += 1;
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // And traced whole, not a probe's stray span.
    let id = format!("UP-{i}");
    post(&client, &base, &key, &id).await;
    receiver
        .wait_for(Duration::from_secs(10), "a whole payment", |r| {
            let spans = r.spans();
            let Some(ingest) = spans.iter().find(|s| {
                s.name == "POST /v1/transactions" && s.attributes.get("transaction_id") == Some(&id)
            }) else {
                return false;
            };
            !one(&spans, "downstream.call", &ingest.trace_id).is_empty()
        })
        .await;
    receiver.stop().await;
}

/// Shutting down against a collector that accepts connections and never
/// answers takes the bounded flush (2 s), not the exporters' 10 s timeouts.
#[tokio::test]
async fn shutdown_does_not_wait_for_a_hanging_collector() {
    // Accepts and holds every connection, answering nothing.
    let hang = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let hang_port = hang.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for c in hang.incoming() {
            held.push(c);
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let (_mock, mock_port) = start_mock(&[]).await;
    let api_port = free_port();
    let mut dev = spawn_dev_with(
        rtpd(),
        dir.path(),
        api_port,
        mock_port,
        &["--otlp", &format!("http://127.0.0.1:{hang_port}")],
        // Nothing is exported before the stop: the spans and metrics are
        // all left for the final flush.
        &[
            ("OTEL_BSP_SCHEDULE_DELAY", "600000"),
            ("OTEL_METRIC_EXPORT_INTERVAL", "600000"),
        ],
    );
    let base = format!("http://127.0.0.1:{api_port}");
    wait_http_ok(&format!("{base}/healthz"), Duration::from_secs(20)).await;
    let key = api_key(dir.path());
    post(&reqwest::Client::new(), &base, &key, "HANG-1").await;

    crate::support::process::terminate(&dev);
    let stopped = std::time::Instant::now();
    let status = loop {
        if let Some(status) = dev.0.try_wait().unwrap() {
            break status;
        }
        assert!(
            stopped.elapsed() < Duration::from_secs(6),
            "rtpd still running 6 s after SIGTERM (a hanging collector held the shutdown)"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "{status}");
    eprintln!("stopped in {:?}", stopped.elapsed());
}

/// With OTLP export off, the ledger's gauges are read by a scrape and by
/// nothing else: no background task polls the ledger.
#[tokio::test]
async fn without_export_only_a_scrape_reads_the_ledger_gauges() {
    let dir = tempfile::tempdir().unwrap();
    let (_mock, mock_port) = start_mock(&[]).await;
    let api_port = free_port();
    let _dev = spawn_dev_with(
        rtpd(),
        dir.path(),
        api_port,
        mock_port,
        &[],
        &[("RTPD_PUBLIC_METRICS", "true")],
    );
    let base = format!("http://127.0.0.1:{api_port}");
    wait_http_ok(&format!("{base}/healthz"), Duration::from_secs(20)).await;
    let counts_calls = |text: &str| {
        gauge(
            text,
            "rtpd_port_call_duration_seconds_count{port=\"ledger\",op=\"counts\",result=\"ok\"} ",
        )
    };
    let client = reqwest::Client::new();
    let scrape = || crate::support::prometheus_at(&client, &base, None);
    assert_eq!(counts_calls(&scrape().await), 1.0, "the scrape's own read");
    assert_eq!(counts_calls(&scrape().await), 2.0);
}

/// `rtpd_ingest_requests_total{code}` as a scrape shows it, over every
/// caller (0 when absent).
fn ingest_count(text: &str, code: u16) -> f64 {
    let code = format!("code=\"{code}\"");
    text.lines()
        .filter(|l| l.starts_with("rtpd_ingest_requests_total{") && l.contains(&code))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// `rtpd_ingest_requests_total{code, caller}` as a scrape shows it (0 when absent).
fn ingest_count_by(text: &str, code: u16, caller: &str) -> f64 {
    let line_start = format!("rtpd_ingest_requests_total{{code=\"{code}\",caller=\"{caller}\"}} ");
    text.lines()
        .find(|l| l.starts_with(&line_start))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

/// Issue 15 findings 7 and 8: every ingest answer names who the caller
/// turned out to be (the 5xx alert reads `credentialed` only, so
/// outsiders cannot move it), a percent-encoded path the router serves as
/// the route is counted, and a client that goes away mid-request is
/// counted once.
#[tokio::test]
async fn ingest_requests_name_the_caller() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let app = support::spawn_app().await;
    let body = |id: &str| json!({ "transaction_id": id, "amount": "1.00" }).to_string();
    assert_eq!(
        app.post_json(&json!({"transaction_id": "CL-1"}))
            .await
            .status(),
        202
    );
    let signed = body("CL-2");
    assert_eq!(
        app.post_signed(&signed, support::now_unix()).await.status(),
        202
    );
    let encoded = app
        .client
        .post(format!("{}/v1/%74ransactions", app.address))
        .header("Content-Type", "application/json")
        .header("X-Api-Key", support::API_KEY)
        .body(body("CL-3"))
        .send()
        .await
        .unwrap();
    assert_eq!(encoded.status(), 202, "the router serves it as the route");
    // An encoded `/` is no separator to the router: not the route, not counted.
    let slash = app
        .client
        .post(format!("{}/v1%2Ftransactions", app.address))
        .header("Content-Type", "application/json")
        .header("X-Api-Key", support::API_KEY)
        .body(body("CL-7"))
        .send()
        .await
        .unwrap();
    assert_eq!(slash.status(), 404);
    assert_eq!(
        app.post_raw(body("CL-4"), "application/json", None)
            .await
            .status(),
        401
    );
    assert_eq!(
        app.post_raw(body("CL-5"), "application/json", Some("wrong-key"))
            .await
            .status(),
        401
    );
    let forged = app
        .post_with_signature(
            &body("CL-6"),
            support::now_unix(),
            &format!("v1={}", "0".repeat(64)),
        )
        .await;
    assert_eq!(forged.status(), 401);
    let text = app.prometheus().await;
    for (code, caller, n) in [
        (202, "credentialed", 3.0),
        (401, "anonymous", 2.0),
        (401, "unverified", 1.0),
        (401, "credentialed", 0.0),
    ] {
        assert_eq!(
            ingest_count_by(&text, code, caller),
            n,
            "{code} {caller}:\n{text}"
        );
    }

    // A client that sends half its body and goes away: counted once.
    let before = app.prometheus().await;
    let total = |text: &str| {
        text.lines()
            .filter(|l| l.starts_with("rtpd_ingest_requests_total{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>()
    };
    {
        let mut s = tokio::net::TcpStream::connect(app.address.trim_start_matches("http://"))
            .await
            .unwrap();
        let head = format!(
            "POST /v1/transactions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n\
             X-Api-Key: {}\r\nContent-Length: 200\r\n\r\n{{\"transaction_id\":",
            support::API_KEY
        );
        s.write_all(head.as_bytes()).await.unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        let _ = s.shutdown().await;
        let mut rest = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest)).await;
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let after = loop {
        let after = app.prometheus().await;
        if total(&after) > total(&before) || std::time::Instant::now() > deadline {
            break after;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(total(&after) - total(&before), 1.0, "{after}");
}

/// A signed vendor verified and then shed (the vendors' pool is full) is a
/// `credentialed` 503: the load shedding the 5xx alert must see (a
/// reviewer found it counted `unverified`).
#[tokio::test]
async fn a_verified_signer_shed_for_a_full_pool_counts_as_credentialed() {
    let app = spawn_app_with(AppOptions {
        configure: |s| {
            s.max_in_flight = 1;
            s.request_timeout_secs = 10.0;
        },
        ..Default::default()
    })
    .await;
    let holder = tokio::spawn(hold_a_slot(app.address.clone()));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let body = json!({ "transaction_id": "SH-1", "amount": "1.00" }).to_string();
    let r = app.post_signed(&body, support::now_unix()).await;
    assert_eq!(r.status(), 503, "shed after its signature was verified");
    let text = app.prometheus().await;
    assert_eq!(ingest_count_by(&text, 503, "credentialed"), 1.0, "{text}");
    assert_eq!(ingest_count_by(&text, 503, "unverified"), 0.0, "{text}");
    holder.await.unwrap();
}

/// Holds an in-flight slot by sending the body of a POST slowly (about 4 s);
/// returns the status line it was answered with.
async fn hold_a_slot(address: String) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let stream = tokio::net::TcpStream::connect(address.trim_start_matches("http://"))
        .await
        .unwrap();
    let (mut rd, mut wr) = stream.into_split();
    let head = format!(
        "POST /v1/transactions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n\
         X-Api-Key: {}\r\nContent-Length: 44\r\nConnection: close\r\n\r\n{{\"transaction_id\":\"HOLD\"",
        support::API_KEY
    );
    let writer = tokio::spawn(async move {
        if wr.write_all(head.as_bytes()).await.is_err() {
            return;
        }
        for b in b"                   }" {
            tokio::time::sleep(Duration::from_millis(200)).await;
            if wr.write_all(&[*b]).await.is_err() {
                return;
            }
        }
    });
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(15), rd.read_to_end(&mut answer))
        .await
        .expect("the server neither answered nor closed")
        .unwrap();
    writer.abort();
    let answer = String::from_utf8_lossy(&answer).into_owned();
    answer.lines().next().unwrap_or_default().to_owned()
}

/// A 503 from the in-flight limit, before the ingest handler, counts in
/// `rtpd_ingest_requests{code="503"}` (which the 5xx alert reads), and every
/// answer to the route counts there exactly once.
#[tokio::test]
async fn load_shedding_503s_count_in_the_ingest_requests() {
    let app = spawn_app_with(AppOptions {
        configure: |s| {
            s.max_in_flight = 1;
            s.request_timeout_secs = 10.0;
        },
        ..Default::default()
    })
    .await;
    let before = app.prometheus().await;
    let mut answered: std::collections::BTreeMap<u16, f64> = Default::default();
    let mut holder = tokio::spawn(hold_a_slot(app.address.clone()));
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let mut n = 0;
    while answered.get(&503).copied().unwrap_or(0.0) < 5.0 {
        assert!(std::time::Instant::now() < deadline, "never saturated");
        if holder.is_finished() {
            // A probe took the slot just as the holder arrived: again.
            let line = (&mut holder).await.unwrap();
            let code = line.split(' ').nth(1).unwrap().parse().unwrap();
            *answered.entry(code).or_default() += 1.0;
            holder = tokio::spawn(hold_a_slot(app.address.clone()));
        }
        n += 1;
        let r = app
            .post_json(&json!({ "transaction_id": format!("SHED-{n}") }))
            .await;
        *answered.entry(r.status().as_u16()).or_default() += 1.0;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let line = holder.await.unwrap();
    let code = line.split(' ').nth(1).unwrap().parse().unwrap();
    *answered.entry(code).or_default() += 1.0;
    let after = app.prometheus().await;
    for (code, seen) in &answered {
        assert_eq!(
            ingest_count(&after, *code) - ingest_count(&before, *code),
            *seen,
            "code {code}: answers {answered:?}\n{after}"
        );
    }
    let total = |text: &str| {
        text.lines()
            .filter(|l| l.starts_with("rtpd_ingest_requests_total{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>()
    };
    assert_eq!(
        total(&after) - total(&before),
        answered.values().sum::<f64>(),
        "each answer counted once: {answered:?}"
    );
}

/// `url.full` on the downstream span is the configured URL without its
/// userinfo and query: a password or a `?code=` key is never exported.
#[tokio::test]
async fn the_downstream_span_does_not_export_the_urls_secrets() {
    let receiver = OtlpReceiver::start();
    let dir = tempfile::tempdir().unwrap();
    let (_mock, mock_port) = start_mock(&[]).await;
    let api_port = free_port();
    let url = format!("http://payer:PA55WORD@127.0.0.1:{mock_port}/process?code=SECRETKEY&x=1");
    let _dev = spawn_dev_with(
        rtpd(),
        dir.path(),
        api_port,
        mock_port,
        &["--otlp", &receiver.url],
        &[
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
            ("RTPD_DOWNSTREAM_URL", &url),
        ],
    );
    let base = format!("http://127.0.0.1:{api_port}");
    wait_http_ok(&format!("{base}/healthz"), Duration::from_secs(20)).await;
    let client = reqwest::Client::new();
    post(&client, &base, &api_key(dir.path()), "URL-1").await;
    receiver
        .wait_for(Duration::from_secs(30), "the downstream span", |r| {
            r.spans().iter().any(|s| s.name == "downstream.call")
        })
        .await;
    let spans = receiver.spans();
    let call = spans.iter().find(|s| s.name == "downstream.call").unwrap();
    assert_eq!(
        call.attributes["result"], "success",
        "the call went through"
    );
    assert_eq!(
        call.attributes["url.full"],
        format!("http://127.0.0.1:{mock_port}/process")
    );
    for s in &spans {
        for v in s.attributes.values() {
            assert!(
                !v.contains("PA55WORD") && !v.contains("SECRETKEY"),
                "{}: {v}",
                s.name
            );
        }
    }
}
